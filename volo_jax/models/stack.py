"""Runs of identical blocks, per layer (a list XLA unrolls) or stacked (one module whose parameters carry a
leading layer axis, applied with nnx.scan so XLA compiles the block body once), each block optionally
rematerialised: its activations recomputed in the backward pass instead of kept from the forward."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

STACK_KEY = "blocks"  # BlockStack.blocks, in state paths: the leaves under it are (layers, ...)

REMAT_POLICIES = {
    "none": None,  # no remat: the forward keeps what the backward needs
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also keep weight matmul outputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # also keep batched (attention) matmul outputs
}


def check_remat(remat: str) -> None:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: choose one of {', '.join(REMAT_POLICIES)}")


def checkpointed(fn: Callable, remat: str) -> Callable:
  """fn(module, *args) rematerialised with `remat`'s policy ('none' returns fn unchanged)."""
  return fn if remat == "none" else nnx.remat(fn, policy=REMAT_POLICIES[remat])


def _call_block(block: nnx.Module, x: jax.Array, drop_path_rate) -> jax.Array:
  return block(x, drop_path_rate=drop_path_rate)


def run_blocks(blocks: Sequence[nnx.Module], x: jax.Array, remat: str) -> jax.Array:
  """Per-layer blocks in order, each with its own static drop-path rate."""
  call = checkpointed(_call_block, remat)
  for block in blocks:
    x = call(block, x, None)
  return x


class BlockStack(nnx.Module):
  """len(drop_path_rates) blocks of one kind as one module with parameters and RNG streams stacked on a leading
  layer axis; the per-layer drop-path rate is scanned alongside them.

  layer_names: the official PyTorch prefix of each layer (`network.2.3`), which weight conversion maps to.
  """

  def __init__(self, make_block: Callable[[float, nnx.Rngs], nnx.Module], drop_path_rates: Sequence[float],
               layer_names: Sequence[str], *, remat: str, rngs: nnx.Rngs):
    check_remat(remat)
    self.drop_path_rates = tuple(drop_path_rates)
    self.layer_names = tuple(layer_names)
    self.remat = remat
    largest = max(self.drop_path_rates)  # every layer needs the RNG stream if any layer drops

    @nnx.split_rngs(splits=len(self.drop_path_rates))
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(layer_rngs):
      return make_block(largest, layer_rngs)

    self.blocks = create(rngs)

  def __len__(self) -> int:
    return len(self.drop_path_rates)

  def __call__(self, x: jax.Array) -> jax.Array:
    scan = nnx.scan(checkpointed(_call_block, self.remat), in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
    return scan(self.blocks, x, jnp.asarray(self.drop_path_rates, jnp.float32))
