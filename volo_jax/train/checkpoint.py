"""Checkpoints of the train state (orbax CheckpointManager: async, every N steps, keep K, save on preemption) and
loading of pretrained weights for `init_from` / evaluation from any of the formats we read."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from volo_jax.convert import flax_io, mapping
from volo_jax.convert.torch_io import CheckpointError
from volo_jax.models import create_model

CHECKPOINT_DIR = "checkpoints"
CONFIG_JSON = "config.json"


class Checkpointer:
  """The workdir's checkpoints. Every process calls every method (orbax coordinates the shards)."""

  def __init__(self, workdir: str, config):
    options = ocp.CheckpointManagerOptions(save_interval_steps=config.checkpoint_every_steps,
                                           max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs carrying the target shardings (the mesh may differ from the writer's)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
      partial_restore=True))
  nnx.update(source, restored["params"], restored["batch_stats"])
  return source
