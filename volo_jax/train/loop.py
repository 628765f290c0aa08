"""train_and_evaluate: config → the run's description (mesh, dataset sizes, model graph, shardings) → state
(restored, pretrained or fresh) → jitted, donated train step → periodic eval, logs, TensorBoard, checkpoints.
The same code runs on one CPU, a GPU host or a TPU pod; XLA:CPU's tuning is chosen here, never in the model."""

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import nnx

from volo_jax.cpu import kernels, xla
from volo_jax.data import pipeline, segmentation_input
from volo_jax.errors import ConfigError, DivergedError, InputStalledError
from volo_jax.train import checkpoint, optim, sharding, step as step_lib, tasks, validate
from volo_jax.train.preemption import PreemptionWatch

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------- the run


def on_cpu_backend() -> bool:
  """Whether the steps run on XLA:CPU, where config.cpu's tuning applies."""
  return jax.default_backend() == "cpu"


def build_model(config, num_classes: int):
  """config's model (a VOLO classifier, or VOLO + UperNet for segmentation) with fresh parameters; on XLA:CPU with
  the CPU-tuned products unless cpu.kernels is off."""
  model = tasks.for_config(config).create_model(config, num_classes, _DTYPES[config.model.dtype])
  if config.cpu.kernels and on_cpu_backend():
    kernels.use_cpu_kernels(model, xla.dot_library(config.cpu.dots))
  return model


def jit(config, fun, **jit_kwargs):
  """jax.jit for the run's steps; on XLA:CPU with config.cpu.dots' compile options."""
  return xla.jit(fun, dots=config.cpu.dots, **jit_kwargs)


def _initial_state(config, tx, num_classes: int, model=None) -> dict:
  if model is None:
    model = build_model(config, num_classes)
  _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return step_lib.initial_state(params, batch_stats, tx, ema=config.ema_decay > 0)


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run is, derived from its config before any data is read or any step compiled."""
  config: Any  # ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  dataset: pipeline.DatasetInfo
  local_batch: int  # this process's share of config.batch_size
  steps_per_epoch: int
  total_steps: int
  tx: optax.GradientTransformation
  graphdef: Any  # the model's nnx.GraphDef
  rng_template: Any  # the model's RNG streams, reseeded every step (step.fresh_rng_state)
  state_sharding: Any  # per leaf of the train state
  abstract_state: Any  # the train state as ShapeDtypeStructs carrying state_sharding (restore target)
  batch_sharding: jax.sharding.NamedSharding


def describe_run(config, *, for_training: bool = True) -> Run:
  """Validates config (ConfigError) and derives the run from it; reads only the dataset's metadata."""
  validate.check_config(config, for_training=for_training)
  mesh = sharding.make_mesh(config)
  dataset = pipeline.dataset_info(config)
  if for_training and config.task == "segmentation":
    segmentation_input.check_labels(config)
  steps_per_epoch = dataset.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"batch_size {config.batch_size} exceeds the {dataset.num_train} training examples")
  tx = optim.make_optimizer(config, steps_per_epoch)
  abstract_model = nnx.eval_shape(lambda: build_model(config, dataset.num_classes))
  graphdef, _, _, rng_template = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)
  abstract_state = jax.eval_shape(lambda: _initial_state(config, tx, dataset.num_classes))
  state_sharding = sharding.state_shardings(abstract_state, mesh)
  return Run(config=config, mesh=mesh, dataset=dataset, local_batch=config.batch_size // jax.process_count(),
             steps_per_epoch=steps_per_epoch,
             total_steps=optim.total_steps(config, steps_per_epoch), tx=tx,
             graphdef=graphdef, rng_template=rng_template, state_sharding=state_sharding,
             abstract_state=jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                         abstract_state, state_sharding),
             batch_sharding=sharding.batch_sharding(mesh))


def init_state(run: Run, model=None) -> dict:
  """The train state at step 0 of `model`'s weights (default: a fresh model), on the host."""
  return _initial_state(run.config, run.tx, run.dataset.num_classes, model)


def weights_state(run: Run, model) -> dict:
  """{params, batch_stats} of `model`, placed with the train state's shardings (for evaluation)."""
  _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  weights = {"params": params, "batch_stats": batch_stats}
  return jax.device_put(weights, {k: run.state_sharding[k] for k in weights})


def jit_eval_step(run: Run, use_ema: bool):
  """The eval step; the state keeps the shardings it has (a train state, or just params and batch stats)."""
  task = tasks.for_config(run.config)
  return jit(run.config, task.make_eval_step(run.graphdef, run.rng_template, run.config, run.dataset.num_classes,
                                             use_ema),
             in_shardings=(None, run.batch_sharding))


def evaluate(run: Run, state, eval_step) -> dict:
  """The task's metrics over the whole eval split (top-1/top-5, or mIoU/aAcc/per-class IoU), every example counted
  once across processes."""
  batches, _ = pipeline.eval_dataset(run.config, local_batch=run.local_batch, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  totals = {}
  for batch in batches:
    totals = tasks.add_counts(totals, eval_step(state, sharding.global_batch(batch, run.mesh)))
  if int(totals["count"]) < run.dataset.num_eval:
    logging.warning("eval: %d of %d images did not decode and were left out",
                    run.dataset.num_eval - int(totals["count"]), run.dataset.num_eval)
  return tasks.for_config(run.config).eval_metrics(totals, run.dataset.class_names)


# ------------------------------------------------------------------------------------------- the start


def _pretrained_model(run: Run, workdir: str):
  """init_from's weights as a host model when the run starts from them (the workdir holds no checkpoint yet).
  Loaded before the workdir is touched, so that a missing, truncated or incompatible init_from changes nothing."""
  config = run.config
  if not config.init_from or checkpoint.has_checkpoint(workdir):
    return None
  model = build_model(config, run.dataset.num_classes)
  report = checkpoint.load_pretrained(model, config.init_from)
  logging.info("initialised from %s: %s", config.init_from, report)
  return model


def _start_state(run: Run, ckpt: checkpoint.Checkpointer, pretrained):
  """Resume order: the workdir's latest checkpoint (or config.resume_step's) once its files verify, else the
  init_from model, else a fresh init. A damaged checkpoint stops the run or, with on_corrupt_checkpoint=fallback,
  gives way to the newest intact one (checkpoint.Checkpointer.resume)."""
  state = ckpt.resume(run.abstract_state, resume_step=run.config.resume_step,
                      on_corrupt=run.config.on_corrupt_checkpoint)
  if state is not None:
    logging.info("resuming from step %d", int(state["step"]))
    return state
  if pretrained is not None:
    return jax.device_put(init_state(run, pretrained), run.state_sharding)
  return jax.jit(lambda: init_state(run), out_shardings=run.state_sharding)()


# ------------------------------------------------------------------------------------------- the workdir


def _model_identity(model_config: dict, keys) -> dict:
  """The model settings a checkpoint depends on: `remat` only trades memory for time, so it may change on resume.
  `keys`: those the older config.json has (a field added since then keeps its default's meaning)."""
  return {k: model_config.get(k) for k in keys if k != "remat"}


def _write_config(config, workdir: str, num_classes: int) -> None:
  resolved = json.loads(config.to_json())
  resolved["model"]["num_classes"] = num_classes
  path = os.path.join(workdir, checkpoint.CONFIG_JSON)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)["model"]
    same = _model_identity(previous, previous) == _model_identity(resolved["model"], previous)
    if not same and not config.force_resume:
      raise ConfigError(f"{workdir} holds a run of model {previous}, not {resolved['model']}; use a new workdir "
                       "(or --config.force_resume=True)")
  if jax.process_index() == 0:  # written whole then renamed: the other processes may be reading it right now
    with open(path + ".tmp", "w") as f:
      json.dump(resolved, f, indent=2)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------- the loop


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
    if config.nonfinite == "stop":
      ckpt.wait()
      raise DivergedError(f"loss {metrics['loss']} / gradient norm {metrics['grad_norm']} at step {step}: stopped, "
                          f"the last good checkpoint is step {ckpt.latest_step()} (--config.nonfinite=skip skips "
                          "such batches instead)")
    logging.warning("step %d: loss %s / gradient norm %s is not finite: batch skipped (%d skipped in all)", step,
                    metrics["loss"], metrics["grad_norm"], metrics["skipped_batches"])
    progress.scalars(step, {"train/skipped_batches": int(metrics["skipped_batches"])})
  return host[-1]


DROPPED_WARNING = 0.05  # a log window that dropped more than this fraction of the examples it read warns


def _report_dropped(batches: pipeline.TrainBatches, dropped: int, delivered: int, total: int) -> None:
  """A warning naming the first error when many of the window's examples were dropped, else an info line."""
  fraction = dropped / (dropped + delivered)
  if fraction > DROPPED_WARNING:
    logging.warning("process %d: %d of the last %d training examples (%.0f%%) were dropped, %d in all; the first "
                    "error: %s (with token labels, `python -m volo_jax.token_labels verify` lists the images without "
                    "a label map)", jax.process_index(), dropped, dropped + delivered, 100 * fraction, total,
                    batches.first_error())
  else:
    logging.info("process %d: %d training examples dropped (%d in all): they did not decode or have no label map",
                 jax.process_index(), dropped, total)


def _first_step(run: Run, train_step, state, batch, stop):
  """The first step, whose call compiles, in a thread, so that SIGTERM during a long compile is acted on at once:
  None when stop() became true first (the thread is left to finish; its result is not used)."""
  result = {}

  def work():
    try:
      with jax.set_mesh(run.mesh):
        result["out"] = train_step(state, batch)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the caller's thread)
      result["error"] = e

  thread = threading.Thread(target=work, daemon=True, name="first-step")
  thread.start()
  while thread.is_alive():
    thread.join(timeout=0.5)
    if thread.is_alive() and stop():
      return None
  if "error" in result:
    raise result["error"]
  return result["out"]


def _stop_while_waiting(what: str, done: int, state, pending: list, config, ckpt, progress) -> None:
  """SIGTERM while waiting for input or a compile: saves the state if steps ran since the last checkpoint."""
  ckpt.wait()
  latest = ckpt.latest_step()
  if done > (latest or 0):
    if pending:
      _check_finite(pending, config, ckpt, progress)
    ckpt.save(done, state, force=True)
    ckpt.wait()
    logging.warning("SIGTERM while %s: checkpoint of step %d saved, exiting", what, done)
  else:
    logging.warning("SIGTERM while %s: %s, nothing to save, exiting", what,
                    f"step {done} is saved already" if latest is not None else "no step ran yet")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains config's experiment in workdir (resuming if it holds checkpoints); returns the last eval metrics.

  Stops early, with a checkpoint at the current step, when SIGTERM arrives (see preemption.py)."""
  run = describe_run(config)  # validates the config before the workdir is touched
  pretrained = _pretrained_model(run, workdir)
  before = _WorkdirSnapshot(workdir)
  checkpoint.check_workdir(workdir)
  _write_config(config, workdir, run.dataset.num_classes)
  ckpt = checkpoint.Checkpointer(workdir, config)
  try:
    with jax.set_mesh(run.mesh):  # scoped: the caller's mesh (or none) is back when training returns
      return _train_loop(run, workdir, ckpt, pretrained)
  except InputStalledError:  # leave the workdir as it was found, unless the run saved a checkpoint first
    if jax.process_index() == 0 and checkpoint.finished_steps(workdir) == before.checkpoint_steps:
      before.restore()
    raise


class _WorkdirSnapshot:
  """The workdir's files, folders and config.json before a run touches it, to put back when the run ends having
  saved nothing."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.existed = os.path.isdir(workdir)
    self.files, self.dirs = _tree(workdir)
    self.checkpoint_steps = checkpoint.finished_steps(workdir)
    config_path = os.path.join(workdir, checkpoint.CONFIG_JSON)
    self.config_json = None
    if os.path.isfile(config_path):
      with open(config_path, "rb") as f:
        self.config_json = f.read()

  def restore(self) -> None:
    if not self.existed:
      shutil.rmtree(self.workdir, ignore_errors=True)
      return
    files, dirs = _tree(self.workdir)
    for path in files - self.files:
      os.remove(path)
    for path in sorted(dirs - self.dirs, key=len, reverse=True):  # deepest first
      shutil.rmtree(path, ignore_errors=True)
    if self.config_json is not None:
      with open(os.path.join(self.workdir, checkpoint.CONFIG_JSON), "wb") as f:
        f.write(self.config_json)


def _tree(directory: str) -> tuple[set, set]:
  """(files, folders) under directory, as paths."""
  files, dirs = set(), set()
  for root, names, file_names in os.walk(directory):
    dirs.update(os.path.join(root, name) for name in names)
    files.update(os.path.join(root, name) for name in file_names)
  return files, dirs


def _train_loop(run: Run, workdir: str, ckpt: checkpoint.Checkpointer, pretrained) -> dict:
  """train_and_evaluate's steps, saves and evaluations, under the run's mesh."""
  config = run.config
  state = _start_state(run, ckpt, pretrained)
  start = int(state["step"])
  task = tasks.for_config(config)
  train_step = jit(config, step_lib.make_train_step(run.graphdef, run.rng_template, run.tx, config,
                                                    run.dataset.num_classes,
                                                    task.loss_fn(config, run.dataset.num_classes)),
                   in_shardings=(run.state_sharding, run.batch_sharding), out_shardings=(run.state_sharding, None),
                   donate_argnums=0)
  eval_step = jit_eval_step(run, use_ema=config.ema_decay > 0)
  lr_fn = optim.lr_schedule(config, run.steps_per_epoch)
  batches = pipeline.train_dataset(config, local_batch=run.local_batch, start_step=start,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  progress = _Progress(workdir, run.total_steps, start)
  preemption = PreemptionWatch(ckpt)
  eval_every = config.eval_every_steps or config.eval_every_epochs * run.steps_per_epoch  # 0: no evaluation
  logging.info("%d steps (%d per epoch), global batch %d on %d devices, %d processes", run.total_steps,
               run.steps_per_epoch, config.batch_size, jax.device_count(), jax.process_count())
  eval_metrics, window_start, window_steps, t0, skipped = {}, time.time(), 0, time.time(), 0
  pending = []  # (step, device metrics) not yet checked for NaN/inf: checked before every log and save
  try:
    for step in range(start, run.total_steps):
      batch = batches.get(stop=preemption.signalled)
      if batch is None:
        _stop_while_waiting("waiting for input", step, state, pending, config, ckpt, progress)
        break
      batch = sharding.global_batch(batch, run.mesh)
      if step == start:
        first = _first_step(run, train_step, state, batch, stop=preemption.signalled)
        if first is None:
          _stop_while_waiting("compiling the first step", step, None, [], config, ckpt, progress)
          break
        state, metrics = first
      else:
        state, metrics = train_step(state, batch)
      done = step + 1
      window_steps += 1
      pending.append((done, metrics))
      preempted = preemption.reached(done)
      saving = preempted or done == run.total_steps or ckpt.should_save(done)
      if saving or done % config.log_every_steps == 0:
        metrics, pending = _check_finite(pending, config, ckpt, progress), []
        elapsed = time.time() - window_start
        images_per_sec = window_steps * config.batch_size / elapsed
        eta = (run.total_steps - done) * elapsed / window_steps
        lr = float(lr_fn(step))
        logging.info("step %d/%d epoch %.2f loss %.4f acc %.3f lr %.3g %.1f img/s ETA %.0fs", done,
                     run.total_steps, done / run.steps_per_epoch, metrics["loss"], metrics["accuracy"], lr,
                     images_per_sec, eta)
        progress.scalars(done, {"train/loss": metrics["loss"], "train/lr": lr,
                                "train/accuracy": metrics["accuracy"], "perf/images_per_sec": images_per_sec})
        progress.advance(window_steps, {"loss": f"{metrics['loss']:.3f}"})
        if batches.skipped > skipped:
          _report_dropped(batches, batches.skipped - skipped, window_steps * run.local_batch, batches.skipped)
          skipped = batches.skipped
        window_start, window_steps = time.time(), 0
      if saving:
        ckpt.save(done, state, force=True)
      if preempted:
        ckpt.wait()
        logging.warning("preempted at step %d: checkpoint saved, exiting", done)
        break
      if eval_every and (done % eval_every == 0 or done == run.total_steps):
        eval_metrics = evaluate(run, state, eval_step)
        text, scalars = task.eval_summary(eval_metrics)
        logging.info("eval at step %d: %s (%d images)", done, text, eval_metrics["count"])
        progress.scalars(done, scalars)
  finally:
    batches.close()
    preemption.close()
    progress.close()
    ckpt.close()
  logging.info("finished in %.0fs", time.time() - t0)
  return eval_metrics
