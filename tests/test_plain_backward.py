"""plain_backward: the custom VJPs give autodiff's gradients (values and dtypes), forward unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from volo_jax import xla_cpu
from volo_jax.models import plain_backward


def _close(a, b, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 3, 5)])
@pytest.mark.parametrize("out", [4, 8])  # fewer outputs than inputs (dy is transposed for dW) and more (x is)
def test_linear_gradients_match_autodiff(shape, out, dtype):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape, dtype)
  w = jax.random.normal(kw, (shape[-1], out), dtype)
  cotangent = jax.random.normal(kc, shape[:-1] + (out,), dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))

  def loss(dot):
    return lambda x, w: jnp.sum(dot(x, w, dims).astype(jnp.float32) * cotangent)

  ours, reference = jax.grad(loss(plain_backward.dot_general), (0, 1)), jax.grad(loss(jax.lax.dot_general), (0, 1))
  for a, b in zip(jax.jit(ours)(x, w), reference(x, w)):
    assert a.dtype == b.dtype and a.shape == b.shape
    _close(a, b, dtype)
  _close(plain_backward.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batched_matmul_gradients_match_autodiff(dtype):
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (2, 3, 4, 9, 9), dtype)  # outlook's per-window (k·k × k·k) weights
  b = jax.random.normal(kb, (2, 3, 4, 9, 5), dtype)
  cotangent = jax.random.normal(kc, (2, 3, 4, 9, 5), dtype)

  def loss(product):
    return lambda a, b: jnp.sum(product(a, b).astype(jnp.float32) * cotangent)

  reference = lambda a, b: jnp.einsum("...ij,...jd->...id", a, b)
  for x, y in zip(jax.jit(jax.grad(loss(plain_backward.batched_matmul), (0, 1)))(a, b),
                  jax.grad(loss(reference), (0, 1))(a, b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    _close(x, y, dtype)
  _close(plain_backward.batched_matmul(a, b), reference(a, b), dtype)


def test_other_contractions_fall_back_to_lax():
  x, w = jnp.ones((3, 4)), jnp.ones((5, 4))
  dims = (((1,), (1,)), ((), ()))  # x·wᵀ: not nnx.Linear's form
  np.testing.assert_array_equal(plain_backward.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))


def test_linear_layer_uses_it_and_trains_like_the_default():
  model = nnx.Linear(5, 3, dot_general=plain_backward.dot_general, rngs=nnx.Rngs(0))
  default = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5))
  grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m) for m in (model, default)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    _close(a, b, jnp.float32)


def test_every_linear_layer_of_the_model_uses_it():
  import volo_jax  # pylint: disable=import-outside-toplevel
  model = volo_jax.create_model("volo_tiny", img_size=32, num_classes=10)
  linears = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
  assert len(linears) > 10 and all(layer.dot_general is plain_backward.dot_general for layer in linears)


@pytest.mark.parametrize("dots", ["ynnpack", "onednn"])  # the backward in head halves or whole
@pytest.mark.parametrize("heads", [1, 3])  # 3: the two head groups of the VJP are uneven (1 + 2)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_gradients_match_autodiff(dtype, heads, dots):
  kq, kk, kv, kc = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(key, (2, heads, 7, 4), dtype) for key in (kq, kk, kv))
  cotangent = jax.random.normal(kc, (2, heads, 7, 4), dtype)

  def reference(q, k, v):
    attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32), axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", attn, v)

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cotangent)

  _close(plain_backward.attention(q, k, v), reference(q, k, v), dtype)
  ours = xla_cpu.jit(jax.grad(loss(plain_backward.attention), (0, 1, 2)), dots=dots)(q, k, v)
  for a, b in zip(ours, jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
    assert a.dtype == b.dtype and a.shape == b.shape
    _close(a, b, dtype)


def test_attention_applies_dropout_to_the_weights():
  q, k, v = (jax.random.normal(key, (2, 3, 7, 4)) for key in jax.random.split(jax.random.key(3), 3))
  mask = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 3, 7, 7))
  drop = lambda attn: jnp.where(mask, attn / 0.7, 0.0)
  attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
  _close(plain_backward.attention(q, k, v, dropout=drop), jnp.einsum("bhqk,bhkd->bhqd", drop(attn), v), jnp.float32)
