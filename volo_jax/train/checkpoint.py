"""Checkpoints of the train state (orbax CheckpointManager: async, every N steps, keep K, save on preemption) and
loading of pretrained weights for `init_from` / evaluation from any of the formats we read."""

import contextlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from volo_jax.convert import flax_io, mapping
from volo_jax.models import create_model
from volo_jax.errors import CheckpointError, CheckpointWriteError, ConfigError

CHECKPOINT_DIR = "checkpoints"
CONFIG_JSON = "config.json"


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a finished checkpoint (orbax names those by their step; partial ones carry a
  temporary suffix until complete)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check_workdir(workdir: str) -> None:
  """Creates the workdir if needed and proves that a file can be written in it, before any work is done."""
  try:
    os.makedirs(os.path.join(workdir, CHECKPOINT_DIR), exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


class Checkpointer:
  """The workdir's checkpoints. Every process calls every method (orbax coordinates the shards).

  A step's checkpoint is written to a temporary directory and renamed when complete, so a crash or a full disk
  mid-save leaves the earlier checkpoints as they were and `latest_step` never names a partial one. Write
  failures (also those of an earlier asynchronous save, which surface at the next save or wait) become a
  CheckpointWriteError that names the step.
  """

  def __init__(self, workdir: str, config):
    options = ocp.CheckpointManagerOptions(save_interval_steps=config.checkpoint_every_steps,
                                           max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight = None  # the step of the last save started

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs carrying the target shardings (the mesh may differ from the writer's)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    self.wait()  # an earlier save's failure is reported with its own step
    with self._write_errors(step):
      started = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if started:
      self._in_flight = step
    return started

  def wait(self) -> None:
    """Blocks until the save in flight is complete on disk."""
    with self._write_errors(self._in_flight):
      self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step):
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:  # orbax and tensorstore raise all three for I/O failures
      kept = [s for s in self.manager.all_steps() if s != step] if os.path.isdir(self.directory) else []
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointWriteError(f"cannot write the checkpoint of step {step} in {self.directory}: {first_line}; "
                                 f"the checkpoints of steps {kept or 'none'} are intact") from e


def load_pretrained(model, path: str) -> mapping.LoadReport:
  """Fills `model` from a PyTorch file (.pth/.pth.tar/.safetensors), a `volo_jax.convert torch2flax` directory,
  or a training workdir of ours; pos_embed is resized and heads reset as the official fine-tuning loader does."""
  if flax_io.is_model_checkpoint(path):
    source = flax_io.load_model_checkpoint(path)
  elif os.path.isfile(os.path.join(path, CONFIG_JSON)):
    with open(os.path.join(path, CONFIG_JSON)) as f:
      source = _model_from_workdir(path, json.load(f)["model"])
  elif os.path.isdir(path):
    raise CheckpointError(f"{path}: neither a converted weights directory nor a training workdir")
  else:
    return mapping.load_torch_weights(model, path)
  return mapping.load_state_dict(model, mapping.state_dict(source))


def _model_from_workdir(workdir: str, model_config: dict):
  """The params and batch stats of a training workdir's latest checkpoint, as a (host-resident) model."""
  source = create_model(model_config["name"], img_size=model_config["img_size"],
                        num_classes=model_config["num_classes"],
                        scan_blocks=model_config.get("scan_blocks", False))
  manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{workdir}: training workdir without a checkpoint")
  weights = {"params": nnx.state(source, nnx.Param), "batch_stats": nnx.state(source, nnx.BatchStat)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, weights)
  try:
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
        partial_restore=True))
  except Exception as e:  # orbax/tensorstore raise many types for truncated or mismatched checkpoints
    raise CheckpointError(f"{workdir}: cannot restore the checkpoint of step {step} into {model_config['name']}: "
                          f"{str(e).strip().splitlines()[0]}") from e
  nnx.update(source, restored["params"], restored["batch_stats"])
  return source
