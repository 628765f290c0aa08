"""Device mesh, shardings of the train state and of batches, and global-array assembly.

Mesh axes: `data` (pure data parallel) × `fsdp` (data parallel whose parameters and optimizer state are also
split across it). Both use AxisType.Auto: we pin the shardings of inputs, state and outputs and let XLA's
propagation place the model's internals, which keeps the model code free of sharding annotations.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from volo_jax.models.stack import STACK_KEY

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14  # smaller tensors are replicated: splitting them costs more than it saves


def make_mesh(config) -> jax.sharding.Mesh:
  """(data, fsdp) mesh over all devices of all processes; mesh.data = -1 takes what fsdp leaves (validate.py has
  checked that the two cover the devices)."""
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else jax.device_count() // fsdp
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def _param_spec(shape: tuple, fsdp: int, stacked: bool) -> P:
  """Split the largest dimension that fsdp divides, never the layer axis of a stacked (scanned) leaf, which
  the scan slices per step; replicate small or indivisible tensors."""
  if fsdp == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(int(stacked), len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*([None] * dim + ["fsdp"]))
  return P()


def _is_stacked(path) -> bool:
  return any(getattr(key, "key", None) == STACK_KEY for key in path)


def state_shardings(abstract_state, mesh):
  """NamedSharding for every array of the train state (params, optimizer moments, batch stats, step)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp, _is_stacked(path))), abstract_state)


def global_batch(local: dict, mesh) -> dict:
  """This process's numpy batch → global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
