"""Dropout and stochastic depth (drop path) as NNX modules."""

import jax
import jax.numpy as jnp
from flax import nnx


def dropout(rate: float, rngs: nnx.Rngs, **kwargs) -> nnx.Dropout:
  """Dropout that carries an RNG stream only when it can drop something."""
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None, **kwargs)


class DropPath(nnx.Module):
  """Stochastic depth: drops whole samples' residual branches, scaling kept ones by 1/(1−rate).

  `rate` is static and decides whether the module draws at all; a call may pass its own rate instead, a traced
  per-layer value in a scanned block stack (whose static rate is the stack's largest).
  """

  def __init__(self, rate: float, rngs: nnx.Rngs):
    self.rate = rate
    self.deterministic = False  # model.eval() sets True
    self.rngs = rngs["dropout"].fork() if rate > 0 else nnx.data(None)

  def __call__(self, x: jax.Array, rate: jax.Array | float | None = None) -> jax.Array:
    if self.deterministic or self.rate == 0:
      return x
    keep = 1.0 - (self.rate if rate is None else rate)
    mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
