"""volo_jax.cpu.kernels: each CPU-tuned form gives its plain layer's outputs and gradients (values and dtypes), and
use_cpu_kernels reaches every hook of a model, per layer and scanned, through nnx.split/merge and eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax
from volo_jax.cpu import kernels, xla as cpu_xla
from volo_jax.models import layers, outlook


def _close(a, b, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def _check_grads(tuned, plain, args, cotangent, dtype, jit=jax.jit):
  """tuned and plain give the same outputs, and the same gradients of <f(args), cotangent> in every argument."""
  _close(tuned(*args), plain(*args), dtype)
  argnums = tuple(range(len(args)))
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)
  for a, b in zip(jit(jax.grad(loss(tuned), argnums))(*args), jax.grad(loss(plain), argnums)(*args)):
    assert a.dtype == b.dtype and a.shape == b.shape
    _close(a, b, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5), (2, 7, 3, 5)])
@pytest.mark.parametrize("out", [4, 8])  # fewer outputs than inputs (dy is transposed for dW) and more (x is)
def test_linear_matches_plain(shape, out, dtype):
  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape, dtype)
  w = jax.random.normal(kw, (shape[-1], out), dtype)
  cotangent = jax.random.normal(kc, shape[:-1] + (out,), dtype)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  _check_grads(lambda x, w: kernels.dot_general(x, w, dims), lambda x, w: jax.lax.dot_general(x, w, dims), (x, w),
               cotangent, dtype)


def test_other_contractions_fall_back_to_lax():
  x, w = jnp.ones((3, 4)), jnp.ones((5, 4))
  dims = (((1,), (1,)), ((), ()))  # x·wᵀ: not nnx.Linear's form
  np.testing.assert_array_equal(kernels.dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_window_matmul_matches_plain(dtype):
  ka, kb, kc = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (2, 3, 4, 9, 9), dtype)  # outlook's per-window (k·k × k·k) weights
  b = jax.random.normal(kb, (2, 3, 4, 9, 5), dtype)
  cotangent = jax.random.normal(kc, (2, 3, 4, 9, 5), dtype)
  _check_grads(kernels.window_matmul, outlook.window_matmul, (a, b), cotangent, dtype)


def test_unfold_fold_match_plain():
  g = outlook.WindowGeometry(13, 11, 3, 2, 1, heads=2)
  kx, ky, kc = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (2, 13, 11, 8))
  y = jax.random.normal(ky, outlook.unfold(x, g).shape)
  _check_grads(lambda x: kernels.unfold(x, g), lambda x: outlook.unfold(x, g), (x,), y, jnp.float32)
  _check_grads(lambda y: kernels.fold(y, g), lambda y: outlook.fold(y, g), (y,), jax.random.normal(kc, x.shape),
               jnp.float32)


@pytest.mark.parametrize("dot_library", kernels.DOT_LIBRARIES)  # the backward whole or in head halves
@pytest.mark.parametrize("heads", [1, 3])  # 3: the two head groups of the VJP are uneven (1 + 2)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_core_matches_plain(dtype, heads, dot_library):
  kq, kk, kv, kc = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(key, (2, heads, 7, 4), dtype) for key in (kq, kk, kv))
  cotangent = jax.random.normal(kc, (2, heads, 7, 4), dtype)
  _check_grads(kernels.ATTENTION_CORES[dot_library], layers.attention_core, (q, k, v), cotangent, dtype,
               jit=lambda f: cpu_xla.jit(f, dots=dot_library))


def test_attention_core_splits_the_backward_in_head_halves_only_for_ynnpack():
  q = jnp.ones((2, 4, 7, 8))
  for dot_library in ("onednn", "ynnpack", "onednn"):
    grad = jax.grad(lambda q, core=kernels.ATTENTION_CORES[dot_library]: core(q, q, q).sum())
    assert ("concatenate" in jax.jit(grad).lower(q).as_text()) == (dot_library == "ynnpack")


def test_tuned_attention_core_applies_dropout_to_the_weights():
  q, k, v = (jax.random.normal(key, (2, 3, 7, 4)) for key in jax.random.split(jax.random.key(3), 3))
  mask = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 3, 7, 7))
  drop = lambda attn: jnp.where(mask, attn / 0.7, 0.0)
  attn = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
  expected = jnp.einsum("bhqk,bhkd->bhqd", drop(attn), v)
  for core in (layers.attention_core, *kernels.ATTENTION_CORES.values()):
    _close(core(q, k, v, drop), expected, jnp.float32)


def _hooks(model) -> dict:
  """Every hook of the model by kind, as (module, attribute) pairs."""
  found = {"linear": [], "attention": [], "outlook": []}
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear):
      found["linear"].append((node, "dot_general"))
    elif isinstance(node, layers.Attention):
      found["attention"].append((node, "attention_core"))
    elif isinstance(node, outlook.OutlookAttention):
      found["outlook"] += [(node, "unfold"), (node, "fold"), (node, "window_matmul")]
  return found


def _tuned(dot_library: str) -> dict:
  return {"linear": [kernels.dot_general], "attention": [kernels.ATTENTION_CORES[dot_library]],
          "outlook": [kernels.unfold, kernels.fold, kernels.window_matmul]}


def _assert_all_tuned(model, dot_library: str):
  for kind, hooks in _hooks(model).items():
    assert all(getattr(module, name) in _tuned(dot_library)[kind] for module, name in hooks), kind


@pytest.mark.parametrize("scan_blocks", [False, True])
@pytest.mark.parametrize("dot_library", kernels.DOT_LIBRARIES)
def test_use_cpu_kernels_reaches_every_hook(scan_blocks, dot_library):
  """volo_tiny: 2 outlookers (v, attn, proj, fc1, fc2), 4 transformers (qkv, proj, fc1, fc2), 2 class blocks
  (kv, q, proj, fc1, fc2), head and aux head: 38 linear layers, 4 attention cores, 2 × 3 outlook hooks (a scanned
  stack holds its blocks' hooks once)."""
  model = volo_jax.create_model("volo_tiny", img_size=32, num_classes=10, scan_blocks=scan_blocks)
  before = _hooks(model)
  assert not any(getattr(m, name) in _tuned(dot_library)[kind] for kind, hooks in before.items() for m, name in hooks)
  expected = {"linear": 38, "attention": 4, "outlook": 6} if not scan_blocks else {
      "linear": 5 + 4 + 10 + 2, "attention": 1, "outlook": 3}
  assert {kind: len(hooks) for kind, hooks in before.items()} == expected
  assert kernels.use_cpu_kernels(model, dot_library) == sum(expected.values())
  _assert_all_tuned(model, dot_library)
  graphdef, state = nnx.split(model)
  _assert_all_tuned(nnx.merge(graphdef, state), dot_library)  # static attributes: in the graphdef

  def build_tuned():  # as a trainer builds its abstract model
    fresh = volo_jax.create_model("volo_tiny", img_size=32, num_classes=10, scan_blocks=scan_blocks)
    kernels.use_cpu_kernels(fresh, dot_library)
    return fresh

  _assert_all_tuned(nnx.eval_shape(build_tuned), dot_library)


def test_use_cpu_kernels_refuses_unknown_libraries():
  with pytest.raises(ValueError, match="dot_library must be one of"):
    kernels.use_cpu_kernels(volo_jax.create_model("volo_tiny", img_size=32, num_classes=10), "mkl")


@pytest.mark.parametrize("scan_blocks", [False, True])
@pytest.mark.parametrize("dot_library", kernels.DOT_LIBRARIES)
def test_tuned_model_matches_plain_in_train_and_eval(dot_library, scan_blocks):
  """volo_tiny in train mode (drop path off; BatchNorm on batch statistics): class and per-token logits and every
  parameter's gradient; in eval mode the logits."""
  plain = volo_jax.create_model("volo_tiny", img_size=32, num_classes=10, scan_blocks=scan_blocks)
  tuned = nnx.clone(plain)
  kernels.use_cpu_kernels(tuned, dot_library)
  images = jax.random.normal(jax.random.key(5), (4, 32, 32, 3))
  cotangent = jax.random.normal(jax.random.key(6), (4, 4, 10))

  def loss(model):
    cls, aux, _ = model.forward_train(images)
    return jnp.sum(cls ** 2) + jnp.sum(aux * cotangent)

  results = []
  for model in (tuned, plain):
    model.train()
    results.append(cpu_xla.jit(lambda m: nnx.value_and_grad(loss)(m), dots=dot_library)(model))
  (tuned_loss, tuned_grads), (plain_loss, plain_grads) = results
  assert float(tuned_loss) == pytest.approx(float(plain_loss), rel=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(tuned_grads), nnx.to_flat_state(plain_grads)):
    a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (np.abs(b).max() + 1e-12), err_msg=str(path))
  for model in (tuned, plain):
    model.eval()
  logits = [nnx.jit(lambda m: m(images))(model) for model in (tuned, plain)]
  np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5 * np.abs(logits[1]).max())
