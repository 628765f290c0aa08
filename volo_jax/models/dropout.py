"""Dropout and stochastic depth (drop path) as NNX modules."""

from flax import nnx


def dropout(rate: float, rngs: nnx.Rngs, **kwargs) -> nnx.Dropout:
  """Dropout that carries an RNG stream only when it can drop something."""
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None, **kwargs)


def drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """Stochastic depth: drops whole samples' residual branches, scaling kept ones by 1/(1-rate)."""
  return dropout(rate, rngs, broadcast_dims=(1, 2, 3))
