"""Outlook attention, VOLO's core op: every window centre predicts a (k·k × k·k) attention over its own k×k
neighbourhood from the token itself (no query-key product), aggregates the unfolded values and folds them back.

Unfold and fold are written as strided slices and plain pads (no gather, scatter or convolution), each the
other's transpose, tied together by a custom VJP so XLA sees the same cheap ops in the backward pass.
`OutlookAttention`'s `unfold`, `fold` and `window_matmul` are static hooks that `volo_jax.cpu.kernels` replaces.
"""

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from volo_jax.models.dropout import dropout
from volo_jax.models.initializers import linear_bias_init, linear_kernel_init


class WindowGeometry(NamedTuple):
  """Static shape facts of one unfold/fold pair (hashable, so it can be a nondiff argument)."""
  height: int
  width: int
  kernel: int
  stride: int
  padding: int
  heads: int

  @property
  def grid(self) -> tuple[int, int]:
    """Number of window positions (h, w), as nn.Unfold counts them."""
    k, s, p = self.kernel, self.stride, self.padding
    return (self.height + 2 * p - k) // s + 1, (self.width + 2 * p - k) // s + 1


def unfold_windows(x: jax.Array, g: WindowGeometry) -> jax.Array:
  """(B, H, W, C) → (B, h, w, heads, k·k, C/heads): the zero-padded k×k windows at stride s.

  The window axis is ordered (ki, kj) row-major and channels split heads-first, which is nn.Unfold's
  (c, ki, kj) order after the official reshape to (B, heads, head_dim, k·k, h·w).
  """
  b, _, _, c = x.shape
  k, s, p = g.kernel, g.stride, g.padding
  h, w = g.grid
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  windows = [
      jax.lax.slice(xp, (0, ki, kj, 0), (b, ki + s * (h - 1) + 1, kj + s * (w - 1) + 1, c), (1, s, s, 1))
      for ki in range(k) for kj in range(k)
  ]  # k·k × (B, h, w, C)
  windows = [win.reshape(b, h, w, g.heads, c // g.heads) for win in windows]
  return jnp.stack(windows, axis=4)  # (B, h, w, heads, k·k, head_dim)


def fold_windows(y: jax.Array, g: WindowGeometry) -> jax.Array:
  """(B, h, w, heads, k·k, C/heads) → (B, H, W, C): col2im, the sum of overlapping windows.

  Padded-frame row r receives window row ki from grid row (r − ki)/s, so rows split by r mod s: each such
  parity plane is a sum of a few shifted (plainly padded) window slices. The planes are then interleaved.
  """
  b, h, w, heads, _, head_dim = y.shape
  c = heads * head_dim
  k, s, p = g.kernel, g.stride, g.padding
  y = y.reshape(b, h, w, heads, k, k, head_dim)
  extra = (k - 1) // s  # grid rows that overlap the same plane
  rows, cols = h + extra, w + extra
  planes = []
  for row_parity in range(s):
    row_planes = []
    for col_parity in range(s):
      terms = [
          jnp.pad(y[:, :, :, :, ki, kj].reshape(b, h, w, c),
                  ((0, 0), (ki // s, rows - h - ki // s), (kj // s, cols - w - kj // s), (0, 0)))
          for ki in range(row_parity, k, s) for kj in range(col_parity, k, s)
      ]
      row_planes.append(sum(terms) if terms else jnp.zeros((b, rows, cols, c), y.dtype))
    planes.append(jnp.stack(row_planes, axis=3))  # (B, rows, cols, s, C)
  frame = jnp.stack(planes, axis=2).reshape(b, rows * s, cols * s, c)  # padded frame, row = s·r + parity
  short_h, short_w = max(0, p + g.height - rows * s), max(0, p + g.width - cols * s)
  if short_h or short_w:  # positions no window reaches are zero
    frame = jnp.pad(frame, ((0, 0), (0, short_h), (0, short_w), (0, 0)))
  return frame[:, p:p + g.height, p:p + g.width]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def unfold(x: jax.Array, g: WindowGeometry) -> jax.Array:
  """Differentiable unfold whose gradient is `fold`, its exact transpose."""
  return unfold_windows(x, g)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def fold(y: jax.Array, g: WindowGeometry) -> jax.Array:
  """Differentiable fold whose gradient is `unfold`, its exact transpose."""
  return fold_windows(y, g)


unfold.defvjp(lambda x, g: (unfold_windows(x, g), None), lambda g, _, ct: (fold_windows(ct, g),))
fold.defvjp(lambda y, g: (fold_windows(y, g), None), lambda g, _, ct: (unfold_windows(ct, g),))


def window_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b over the last two axes (equal leading axes): each window's (k·k × k·k) weights times its values."""
  return jnp.einsum("...ij,...jd->...id", a, b)


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
  """AvgPool2d(kernel=stride=s, ceil_mode=True): edge windows average only their in-bounds pixels."""
  b, height, width, c = x.shape
  h, w = math.ceil(height / stride), math.ceil(width / stride)
  xp = jnp.pad(x, ((0, 0), (0, h * stride - height), (0, w * stride - width), (0, 0)))
  sums = xp.reshape(b, h, stride, w, stride, c).sum(axis=(2, 4))
  rows = np.minimum(stride, height - stride * np.arange(h))
  cols = np.minimum(stride, width - stride * np.arange(w))
  counts = (rows[:, None] * cols[None, :]).astype(np.float32)[..., None]  # (h, w, 1)
  return (sums / counts).astype(x.dtype)


class OutlookAttention(nnx.Module):
  """Outlook attention over k×k windows on a stride-s grid (VOLO stage 1).

  unfold, fold, window_matmul: static hooks with the signatures and results of this module's functions.
  """

  def __init__(self, dim: int, num_heads: int, *, kernel_size: int = 3, padding: int = 1, stride: int = 2,
               qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads, self.kernel_size, self.padding, self.stride = num_heads, kernel_size, padding, stride
    self.scale = (dim // num_heads) ** -0.5
    dense = dict(dtype=dtype, kernel_init=linear_kernel_init, bias_init=linear_bias_init,
                 dot_general=jax.lax.dot_general, rngs=rngs)
    self.v = nnx.Linear(dim, dim, use_bias=qkv_bias, **dense)
    self.attn = nnx.Linear(dim, kernel_size**4 * num_heads, **dense)
    self.proj = nnx.Linear(dim, dim, **dense)
    self.attn_drop = dropout(attn_drop, rngs)
    self.proj_drop = dropout(proj_drop, rngs)
    self.unfold, self.fold, self.window_matmul = unfold, fold, window_matmul

  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, _ = x.shape
    k, heads = self.kernel_size, self.num_heads
    g = WindowGeometry(height, width, k, self.stride, self.padding, heads)
    h, w = g.grid
    if (h, w) != (math.ceil(height / self.stride), math.ceil(width / self.stride)):
      raise ValueError(f"kernel {k}, padding {self.padding}, stride {self.stride} do not tile {height}×{width}")
    v = self.unfold(self.v(x), g)  # (B, h, w, heads, k·k, head_dim)
    logits = self.attn(avg_pool_ceil(x, self.stride)).reshape(b, h, w, heads, k * k, k * k)
    attn = jax.nn.softmax(logits.astype(jnp.float32) * self.scale, axis=-1).astype(v.dtype)
    attn = self.attn_drop(attn)
    out = self.window_matmul(attn, v)  # per window (k·k × k·k) @ (k·k × head_dim): (B, h, w, heads, k·k, hd)
    return self.proj_drop(self.proj(self.fold(out, g)))
