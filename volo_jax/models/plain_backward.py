"""Products whose backward pass hands XLA:CPU no transposed left operand.

XLA:CPU's products with a transposed lhs, the backward's xᵀ·dy and Aᵀ·dO, ran at half speed in YNNPACK or fell
back to Eigen's batched matmul (≈ 10 GFLOP/s for attention's Aᵀ·dO at d1); in oneDNN up to 2.6× slower than the
plain form (6272×576·576×192: 138 vs 366 GFLOP/s). These custom VJPs transpose the smaller operand explicitly
behind an optimization barrier, which keeps XLA from folding the transpose back into the product.
volo_d1 train step, batch 8, 2 cores: 0.90× the time (9 of 9 interleaved pairs faster). Forward passes are
unchanged; other backends use plain autodiff.
"""

import jax
import jax.numpy as jnp

from volo_jax import xla_cpu


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  # dx = dy·Wᵀ contracting W's last axis: YNNPACK and oneDNN take the transposed W as it is (with oneDNN's dots
  # the d1 train step took 0.988× the time of an explicit Wᵀ, 11 of 14 alternated steps faster)
  dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))  # (…, out)·(in, out)ᵀ
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (rows, in), (rows, out)
  if x2.shape[1] > dy2.shape[1]:  # dW = (dyᵀ·x)ᵀ: dy is the smaller, the result small
    dw = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dy2.T) @ x2).T  # (out, rows)·(rows, in)
  else:
    dw = jax.lax.optimization_barrier(x2.T) @ dy2  # (in, rows)·(rows, out)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
  """`jax.lax.dot_general` for nnx.Linear (x·W over x's last axis) with the plain-operand backward on CPU."""
  (lhs_contract, rhs_contract), batch = dimension_numbers
  plain = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and batch == ((), ())
           and rhs.ndim == 2 and precision is None and preferred_element_type is None and out_sharding is None)
  if plain and _on_cpu():  # token-wise layers: dW transposes the smaller of x and dy (MLP fwd+bwd 81 → 59 ms)
    return _matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def _attention_forward(q, k, v, dropout=None):
  attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), axis=-1).astype(v.dtype)
  if dropout is not None:
    attn = dropout(attn)
  return jnp.einsum("bhqk,bhkd->bhqd", attn, v), attn


@jax.custom_vjp
def _attention(q, k, v):
  """Without differentiation (inference, eval) the softmax's division moves onto the (N, head_dim) output:
  exp(s − max)·v / Σexp skips a pass over the N×N weights (d1's stage-2 shape, batch 8: 10.6 → 7.3 ms)."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v).astype(jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


def _in_head_halves(fn, *arrays):
  """fn on each half of the heads (axis 1) as independent ops, results re-joined along the heads.

  YNNPACK runs a batched product with a head_dim-wide side (dS·K, dOᵀ·A, Qᵀ·dS of the backward) on one core;
  two independent halves let XLA's concurrency-optimized scheduler put one on each core (volo_d1 train step,
  batch 8, 2 cores: one core idle 558 → 373 ms per step; step 0.96×). The forward's A·V is the same shape, but
  splitting it measured no faster in the train step and slower in inference.
  """
  half = arrays[0].shape[1] // 2
  if half == 0:
    return fn(*arrays)
  parts = [fn(*(a[:, :half] for a in arrays)), fn(*(a[:, half:] for a in arrays))]
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), *parts)


def _attention_fwd(q, k, v):
  out, attn = _attention_forward(q, k, v)
  return out, (q, k, v, attn)


def _attention_bwd(residuals, d_out):
  """In head halves where XLA:CPU's products run in YNNPACK; whole where the step (`xla_cpu.jit`) gives them to
  oneDNN, whose products use both cores and for which the halves' strided slices of the N×N weights only cost:
  the core's fwd+bwd at d1's stage-2 shape, batch 8, 14.1 vs 19.8 ms; the d1 train step 0.970× and 0.981× the
  time (9 of 14 and 12 of 16 alternated steps faster)."""
  if xla_cpu.onednn_dots():
    return _attention_bwd_core(*residuals, d_out)
  return _in_head_halves(_attention_bwd_core, *residuals, d_out)


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


_attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def _batched_matmul(a, b):
  return jnp.einsum("...ij,...jd->...id", a, b)


def _batched_matmul_fwd(a, b):
  return _batched_matmul(a, b), (a, b)


def _batched_matmul_bwd(residuals, d_out):
  a, b = residuals  # (…, i, j), (…, j, d)
  a_t, b_t = jax.lax.optimization_barrier((jnp.swapaxes(a, -1, -2), jnp.swapaxes(b, -1, -2)))
  return jnp.einsum("...id,...dj->...ij", d_out, b_t), jnp.einsum("...ji,...id->...jd", a_t, d_out)


_batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


def batched_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b over the last two axes (equal leading axes), with the plain-operand backward on CPU: outlook
  attention's 9×9 products, whose transposed-operand gradients went to Eigen at ≈ 1.5 GFLOP/s."""
  return _batched_matmul(a, b) if _on_cpu() else jnp.einsum("...ij,...jd->...id", a, b)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout=None) -> jax.Array:
  """softmax(q·kᵀ)·v over (B, heads, N, head_dim) inputs, q already scaled; softmax in float32. With `dropout`
  (applied to the attention weights, between softmax and product) it is plain autodiff on every backend."""
  if dropout is None and _on_cpu():
    return _attention(q, k, v)
  return _attention_forward(q, k, v, dropout)[0]
