"""CPU-tuned forms of the model's replaceable products: custom VJPs that give XLA:CPU's backward products no
transposed left operand (slow in its dot libraries), and an attention core that skips a pass over the weights.

  use_cpu_kernels(model, dot_library)  # dot_library: "onednn" | "ynnpack", see volo_jax.cpu.xla.dot_library

switches a built model's hooks (every nnx.Linear's `dot_general`, `Attention.attention_core`, OutlookAttention's
`unfold`, `fold` and `window_matmul`) onto these, in place; they are static attributes, so nnx.split/merge keep
them. Each gives the plain layer's outputs and gradients to float round-off. Nothing here checks the backend.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from volo_jax.models import layers, outlook

DOT_LIBRARIES = ("onednn", "ynnpack")


# ------------------------------------------------------------------------------------------ linear layers

@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  # dx = dy·Wᵀ contracting W's last axis: YNNPACK and oneDNN take the transposed W as it is.
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))  # (…, out)·(in, out)ᵀ
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (rows, in), (rows, out)
  # dW transposes the smaller of x and dy, behind a barrier that keeps XLA from folding it back into the product.
  if x2.shape[1] > dy2.shape[1]:  # dW = (dyᵀ·x)ᵀ: dy is the smaller, the result small
    dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy2.T) @ x2).T  # (out, rows)·(rows, in)
  else:
    dw = jax.lax.optimization_barrier(x2.T) @ dy2  # (in, rows)·(rows, out)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """`jax.lax.dot_general` for nnx.Linear: x·W over x's last axis gets the plain-operand backward, any other
  contraction is lax's."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and batch == ((), ())
           and rhs.ndim == 2 and precision is None and preferred_element_type is None and out_sharding is None)
  if plain:
    return _matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, out_sharding=out_sharding)


# ------------------------------------------------------------------------------------------ attention core

def _attention_forward(q, k, v):
  attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", attn, v), attn


def _attention_primal(q, k, v):
  """Without differentiation (inference, eval) the softmax's division moves onto the (N, head_dim) output:
  exp(s − max)·v / Σexp skips a pass over the N×N weights."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v).astype(jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _attention_fwd(q, k, v):
  out, attn = _attention_forward(q, k, v)
  return out, (q, k, v, attn)


def _attention_bwd_core(q, k, v, attn, d_out):
  # (B, heads, N, head_dim) ×3, (B, heads, N, N), (B, heads, N, head_dim)
  d_attn = jnp.einsum("bhqd,bhkd->bhqk", d_out, v).astype(jnp.float32)
  attn32 = attn.astype(jnp.float32)
  d_logits = (attn32 * (d_attn - jnp.sum(d_attn * attn32, axis=-1, keepdims=True))).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
  # dV = Aᵀ·dO and dK = dSᵀ·Q as (dOᵀ·A)ᵀ and (Qᵀ·dS)ᵀ: only (N, head_dim) tensors are transposed
  d_out_t, q_t = jax.lax.optimization_barrier((jnp.swapaxes(d_out, -1, -2), jnp.swapaxes(q, -1, -2)))
  dv_t, dk_t = jax.lax.optimization_barrier((jnp.einsum("bhdq,bhqk->bhdk", d_out_t, attn),
                                             jnp.einsum("bhdq,bhqk->bhdk", q_t, d_logits)))
  return dq, jnp.swapaxes(dk_t, -1, -2), jnp.swapaxes(dv_t, -1, -2)


def _in_head_halves(fn, *arrays):
  """fn on each half of the heads (axis 1) as independent ops, results re-joined along the heads: YNNPACK runs
  a batched product with a head_dim-wide side on one core, and two independent halves can use two."""
  half = arrays[0].shape[1] // 2
  if half == 0:
    return fn(*arrays)
  parts = [fn(*(a[:, :half] for a in arrays)), fn(*(a[:, half:] for a in arrays))]
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), *parts)


_attention_whole = jax.custom_vjp(_attention_primal)
_attention_whole.defvjp(_attention_fwd, lambda residuals, d_out: _attention_bwd_core(*residuals, d_out))
_attention_halves = jax.custom_vjp(_attention_primal)
_attention_halves.defvjp(_attention_fwd,
                         lambda residuals, d_out: _in_head_halves(_attention_bwd_core, *residuals, d_out))


def attention_core_onednn(q, k, v, dropout=None):
  """`layers.attention_core` with the backward whole: oneDNN's products use every core, and the halves' strided
  slices of the N×N weights only cost there. With dropout, the plain core."""
  return _attention_whole(q, k, v) if dropout is None else layers.attention_core(q, k, v, dropout)


def attention_core_ynnpack(q, k, v, dropout=None):
  """`layers.attention_core` with the backward in head halves, for YNNPACK's products. With dropout, the plain
  core."""
  return _attention_halves(q, k, v) if dropout is None else layers.attention_core(q, k, v, dropout)


ATTENTION_CORES = {"onednn": attention_core_onednn, "ynnpack": attention_core_ynnpack}


# ------------------------------------------------------------------------------------------ outlook attention

@jax.custom_vjp
def window_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """`outlook.window_matmul` with the plain-operand backward: its transposed-operand 9×9 products went to
  XLA's slow generic batched matmul."""
  return jnp.einsum("...ij,...jd->...id", a, b)


def _window_matmul_fwd(a, b):
  return window_matmul(a, b), (a, b)


def _window_matmul_bwd(residuals, d_out):
  a, b = residuals  # (…, i, j), (…, j, d)
  a_t, b_t = jax.lax.optimization_barrier((jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)))
  return jnp.einsum("...id,...dj->...ij", d_out, b_t), jnp.einsum("...ji,...id->...jd", a_t, d_out)


window_matmul.defvjp(_window_matmul_fwd, _window_matmul_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def unfold(x: jax.Array, g: outlook.WindowGeometry) -> jax.Array:
  """`outlook.unfold` whose gradient, fold, sits behind a barrier that keeps XLA:CPU from fusing it into the
  neighbouring weight-gradient dot."""
  return outlook.unfold_windows(x, g)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def fold(y: jax.Array, g: outlook.WindowGeometry) -> jax.Array:
  """`outlook.fold` whose gradient, unfold, sits behind a barrier as in `unfold`."""
  return outlook.fold_windows(y, g)


unfold.defvjp(lambda x, g: (outlook.unfold_windows(x, g), None),
              lambda g, _, ct: (jax.lax.optimization_barrier(outlook.fold_windows(ct, g)),))
fold.defvjp(lambda y, g: (outlook.fold_windows(y, g), None),
            lambda g, _, ct: (jax.lax.optimization_barrier(outlook.unfold_windows(ct, g)),))


# ------------------------------------------------------------------------------------------ switch

def use_cpu_kernels(model: nnx.Module, dot_library: str) -> int:
  """Sets every hook in `model` (scanned block stacks included) to its CPU-tuned form for XLA:CPU products in
  `dot_library` ("onednn" or "ynnpack"), in place; returns how many hooks it set."""
  if dot_library not in DOT_LIBRARIES:
    raise ValueError(f"dot_library must be one of {DOT_LIBRARIES}, got {dot_library!r}")
  hooks = 0
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Linear):
      module.dot_general = dot_general
      hooks += 1
    elif isinstance(module, layers.Attention):
      module.attention_core = ATTENTION_CORES[dot_library]
      hooks += 1
    elif isinstance(module, outlook.OutlookAttention):
      module.unfold, module.fold, module.window_matmul = unfold, fold, window_matmul
      hooks += 3
  return hooks
