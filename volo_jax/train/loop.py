"""train_and_evaluate: mesh → data → sharded state (restored, pretrained or fresh) → jitted, donated train step
→ periodic eval, logs, TensorBoard, checkpoints. The same code runs on one CPU, a GPU host or a TPU pod."""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from flax import nnx

from volo_jax import xla_cpu
from volo_jax.data import pipeline
from volo_jax.models import create_model
from volo_jax.train import checkpoint, optim, sharding, step as step_lib, validate
from volo_jax.train.errors import ConfigError, DivergedError
from volo_jax.train.preemption import PreemptionWatch

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, num_classes: int):
  m = config.model
  tl = config.get("token_label")
  return create_model(m.name, img_size=m.img_size, num_classes=num_classes,
                      seed=config.seed, drop_path_rate=m.drop_path_rate,
                      mix_token=bool(tl) and tl.enabled and tl.mix_token,
                      drop_rate=m.get("drop_rate", 0.0), attn_drop_rate=m.get("attn_drop_rate", 0.0),
                      scan_blocks=m.get("scan_blocks", False), remat=m.get("remat", "none"),
                      dtype=_DTYPES[m.get("dtype", "float32")])


def _check_token_labels(config) -> None:
  """Fail before any compilation when token labeling is on but cannot run."""
  tl = config.get("token_label")
  if not tl or not tl.enabled:
    return
  if tl.size * 16 != config.model.img_size:
    raise ValueError(f"token_label.size {tl.size} must be img_size/16 = {config.model.img_size / 16} (one "
                     "target per token of the model's 16-pixel grid)")
  pipeline.token_label_store(config)  # raises when the prepared label maps are missing


class Setup:
  """Everything derived from the config before the first step: mesh, sizes, model graph, step functions."""

  def __init__(self, config, *, for_training: bool = True):
    validate.check_config(config, for_training=for_training)
    self.config = config
    if for_training:
      _check_token_labels(config)
    self.mesh = sharding.make_mesh(config)
    self.info = pipeline.dataset_info(config)
    self.local_batch = config.batch_size // jax.process_count()
    self.steps_per_epoch = self.info.num_train // config.batch_size
    if self.steps_per_epoch == 0:
      raise ConfigError(f"batch_size {config.batch_size} exceeds the {self.info.num_train} training examples")
    self.total_steps = config.get("total_steps") or optim.total_steps(config, self.steps_per_epoch)
    self.tx = optim.make_optimizer(config, self.steps_per_epoch)
    abstract_model = nnx.eval_shape(lambda: build_model(config, self.info.num_classes))
    self.graphdef, _, _, self.rng_template = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
    self.abstract_state = jax.eval_shape(self.init_state)
    self.state_sharding = sharding.state_shardings(self.abstract_state, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)

  def init_state(self, model=None):
    if model is None:
      model = build_model(self.config, self.info.num_classes)
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return step_lib.initial_state(params, batch_stats, self.tx, ema=self.config.get("ema_decay", 0.0) > 0)

  def sharded_abstract_state(self):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.abstract_state,
                        self.state_sharding)

  def evaluate(self, state, eval_step) -> dict:
    """top-1/top-5 over the whole eval split, every example counted once across processes."""
    batches, _ = pipeline.eval_dataset(self.config, local_batch=self.local_batch,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    totals = {"top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in batches:
      counts = eval_step(state, sharding.global_batch(batch, self.mesh))
      totals = {k: totals[k] + float(counts[k]) for k in totals}
    if int(totals["count"]) < self.info.num_eval:
      logging.warning("eval: %d of %d images did not decode and were left out",
                      self.info.num_eval - int(totals["count"]), self.info.num_eval)
    return {"top1": totals["top1"] / max(totals["count"], 1), "top5": totals["top5"] / max(totals["count"], 1),
            "count": int(totals["count"])}

  def jit(self, fun, **jit_kwargs):
    """jax.jit for the run's steps, with the library that runs XLA:CPU's products (config.xla_cpu_dots)."""
    return xla_cpu.jit(fun, dots=self.config.get("xla_cpu_dots", "auto"), **jit_kwargs)

  def jit_eval_step(self, use_ema: bool):
    """The state keeps the shardings it has (a train state, or just params and batch stats)."""
    return self.jit(step_lib.make_eval_step(self.graphdef, self.rng_template, use_ema),
                    in_shardings=(None, self.batch_sharding))

  def weights_state(self, model):
    """{params, batch_stats} of `model`, placed with the train state's shardings (for evaluation)."""
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    weights = {"params": params, "batch_stats": batch_stats}
    return jax.device_put(weights, {k: self.state_sharding[k] for k in weights})


def _pretrained_model(setup: Setup, workdir: str):
  """init_from's weights as a host model when the run starts from them (the workdir holds no checkpoint yet).
  Loaded before the workdir is touched, so that a missing, truncated or incompatible init_from changes nothing."""
  config = setup.config
  if not config.get("init_from") or checkpoint.has_checkpoint(workdir):
    return None
  model = build_model(config, setup.info.num_classes)
  report = checkpoint.load_pretrained(model, config.init_from)
  logging.info("initialised from %s: %s", config.init_from, report)
  return model


def _initial_state(setup: Setup, ckpt: checkpoint.Checkpointer, pretrained):
  """Resume order: latest checkpoint in the workdir, else the init_from model, else a fresh init."""
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("resuming from step %d", latest)
    return ckpt.restore(latest, setup.sharded_abstract_state())
  if pretrained is not None:
    return jax.device_put(setup.init_state(pretrained), setup.state_sharding)
  return jax.jit(setup.init_state, out_shardings=setup.state_sharding)()


def _model_identity(model_config: dict) -> dict:
  """The model settings a checkpoint depends on: `remat` only trades memory for time, so it may change on resume."""
  return {k: v for k, v in model_config.items() if k != "remat"}


def _write_config(config, workdir: str, num_classes: int) -> None:
  resolved = json.loads(config.to_json())
  resolved["model"]["num_classes"] = num_classes
  path = os.path.join(workdir, checkpoint.CONFIG_JSON)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)["model"]
    if _model_identity(previous) != _model_identity(resolved["model"]) and not config.get("force_resume"):
      raise ConfigError(f"{workdir} holds a run of model {previous}, not {resolved['model']}; use a new workdir "
                       "(or --config.force_resume=True)")
  if jax.process_index() == 0:  # written whole then renamed: the other processes may be reading it right now
    with open(path + ".tmp", "w") as f:
      json.dump(resolved, f, indent=2)
    os.replace(path + ".tmp", path)


class _Progress:
  """Log lines, TensorBoard scalars (process 0 only) and an interactive bar."""

  def __init__(self, workdir: str, total_steps: int, start_step: int):
    self.main = jax.process_index() == 0
    self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) if self.main else None
    self.bar = None
    if self.main and sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def scalars(self, step: int, values: dict) -> None:
    if self.writer:
      with self.writer.as_default(step=step):
        for tag, value in values.items():
          tf.summary.scalar(tag, value)
      self.writer.flush()

  def advance(self, n: int, postfix: dict | None = None) -> None:
    if self.bar:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix)

  def close(self):
    if self.bar:
      self.bar.close()
    if self.writer:
      self.writer.close()


def _check_finite(pending: list, config, ckpt, progress) -> dict:
  """Fetches the metrics of the steps run since the last check and acts on non-finite ones: 'stop' raises,
  naming the first bad step (that step and later ones are never saved); 'skip' logs each skipped batch (the
  step left the state unchanged). Returns the host metrics of the last step."""
  host = jax.device_get([metrics for _, metrics in pending])
  for (step, _), metrics in zip(pending, host):
    if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
      continue
    if config.get("nonfinite", "stop") == "stop":
      ckpt.wait()
      raise DivergedError(f"loss {metrics['loss']} / gradient norm {metrics['grad_norm']} at step {step}: stopped, "
                          f"the last good checkpoint is step {ckpt.latest_step()} (--config.nonfinite=skip skips "
                          "such batches instead)")
    logging.warning("step %d: loss %s / gradient norm %s is not finite: batch skipped (%d skipped in all)", step,
                    metrics["loss"], metrics["grad_norm"], metrics["skipped_batches"])
    progress.scalars(step, {"train/skipped_batches": int(metrics["skipped_batches"])})
  return host[-1]


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config's experiment in workdir (resuming if it holds checkpoints); returns the last eval metrics.

  Stops early, with a checkpoint at the current step, when SIGTERM arrives (see preemption.py)."""
  setup = Setup(config)  # validates the config before the workdir is touched
  pretrained = _pretrained_model(setup, workdir)
  checkpoint.check_workdir(workdir)
  _write_config(config, workdir, setup.info.num_classes)
  ckpt = checkpoint.Checkpointer(workdir, config)
  with jax.set_mesh(setup.mesh):  # scoped: the caller's mesh (or none) is back when training returns
    return _train_loop(config, workdir, setup, ckpt, pretrained)


def _train_loop(config, workdir: str, setup: Setup, ckpt: checkpoint.Checkpointer, pretrained) -> dict:
  """train_and_evaluate's steps, saves and evaluations, under the run's mesh."""
  state = _initial_state(setup, ckpt, pretrained)
  start = int(state["step"])
  train_step = setup.jit(
      step_lib.make_train_step(setup.graphdef, setup.rng_template, setup.tx, config, setup.info.num_classes),
      in_shardings=(setup.state_sharding, setup.batch_sharding), out_shardings=(setup.state_sharding, None),
      donate_argnums=0)
  eval_step = setup.jit_eval_step(use_ema=config.get("ema_decay", 0.0) > 0)
  lr_fn = optim.lr_schedule(config, setup.steps_per_epoch)
  batches = pipeline.train_dataset(config, local_batch=setup.local_batch, start_step=start,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  progress = _Progress(workdir, setup.total_steps, start)
  preemption = PreemptionWatch(ckpt)
  eval_every = config.eval_every_epochs * setup.steps_per_epoch  # 0: no evaluation
  logging.info("%d steps (%d per epoch), global batch %d on %d devices, %d processes", setup.total_steps,
               setup.steps_per_epoch, config.batch_size, jax.device_count(), jax.process_count())
  eval_metrics, window_start, window_steps, t0, skipped = {}, time.time(), 0, time.time(), 0
  pending = []  # (step, device metrics) not yet checked for NaN/inf: checked before every log and save
  try:
    for step in range(start, setup.total_steps):
      state, metrics = train_step(state, sharding.global_batch(next(batches), setup.mesh))
      done = step + 1
      window_steps += 1
      pending.append((done, metrics))
      preempted = preemption.reached(done)
      saving = preempted or done == setup.total_steps or ckpt.should_save(done)
      if saving or done % config.log_every_steps == 0:
        metrics, pending = _check_finite(pending, config, ckpt, progress), []
        elapsed = time.time() - window_start
        images_per_sec = window_steps * config.batch_size / elapsed
        eta = (setup.total_steps - done) * elapsed / window_steps
        lr = float(lr_fn(step))
        logging.info("step %d/%d epoch %.2f loss %.4f acc %.3f lr %.3g %.1f img/s ETA %.0fs", done,
                     setup.total_steps, done / setup.steps_per_epoch, metrics["loss"], metrics["accuracy"], lr,
                     images_per_sec, eta)
        progress.scalars(done, {"train/loss": metrics["loss"], "train/lr": lr,
                                "train/accuracy": metrics["accuracy"], "perf/images_per_sec": images_per_sec})
        progress.advance(window_steps, {"loss": f"{metrics['loss']:.3f}"})
        window_start, window_steps = time.time(), 0
        if batches.skipped > skipped:
          skipped = batches.skipped
          logging.warning("process %d: %d training images skipped so far: they did not decode or, with token labels, "
                          "have no label map (`python -m volo_jax.token_labels verify` lists those)",
                          jax.process_index(), skipped)
      if saving:
        ckpt.save(done, state, force=True)
      if preempted:
        ckpt.wait()
        logging.warning("preempted at step %d: checkpoint saved, exiting", done)
        break
      if eval_every and (done % eval_every == 0 or done == setup.total_steps):
        eval_metrics = setup.evaluate(state, eval_step)
        logging.info("eval at step %d: top-1 %.4f top-5 %.4f (%d images)", done, eval_metrics["top1"],
                     eval_metrics["top5"], eval_metrics["count"])
        progress.scalars(done, {"eval/top1": eval_metrics["top1"], "eval/top5": eval_metrics["top5"]})
  finally:
    preemption.close()
    progress.close()
    ckpt.close()
  logging.info("finished in %.0fs", time.time() - t0)
  return eval_metrics
