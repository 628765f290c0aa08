"""volo_jax.cpu.xla: the choice of XLA:CPU's dot library, VOLO's CPU-tuned path compiled with oneDNN's dots
against timm, and convolutions kept out of YNNPACK.

The checks on XLA's fusion names (`__ynn_fusion`, `__onednn_fusion` in the compiled HLO) hold for jax/jaxlib
0.10.2, whose XLA:CPU names its library fusions so; they keep the compile options from silently meaning nothing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import converted_volo, nhwc_batch, randomised_timm_volo, relative_error, torch, torch_logits
from volo_jax.convert.mapping import state_dict
from volo_jax.cpu import kernels, xla as xla_cpu


def test_auto_picks_onednn_exactly_on_avx512_cpus():
  assert jax.default_backend() == "cpu"
  convolutions = xla_cpu.EIGEN_CONVOLUTIONS
  assert xla_cpu.compiler_options("ynnpack") == convolutions
  assert xla_cpu.compiler_options("onednn") == {**convolutions, **xla_cpu.ONEDNN_DOTS}
  assert xla_cpu.compiler_options() == {**convolutions, **(xla_cpu.ONEDNN_DOTS if xla_cpu.has_avx512() else {})}
  assert xla_cpu.compiler_options("default") == {}  # XLA's own defaults
  for bad in (xla_cpu.compiler_options, xla_cpu.dot_library):
    with pytest.raises(ValueError, match="dots must be one of"):
      bad("mkl")


def test_dot_library_names_the_library_of_each_choice():
  assert xla_cpu.dot_library() == ("onednn" if xla_cpu.has_avx512() else "ynnpack")
  assert xla_cpu.dot_library("onednn") == "onednn"
  assert xla_cpu.dot_library("ynnpack") == xla_cpu.dot_library("default") == "ynnpack"
  assert all(xla_cpu.dot_library(dots) in kernels.DOT_LIBRARIES for dots in xla_cpu.CHOICES)


def test_jit_is_jax_jit_with_the_options():
  fun = lambda x: x * 2
  for dots in xla_cpu.CHOICES:
    jitted = xla_cpu.jit(fun, dots=dots, donate_argnums=0)
    assert jitted.lower(jnp.ones(3)).as_text() == jax.jit(fun, donate_argnums=0).lower(jnp.ones(3)).as_text()


def test_convolutions_compile_outside_ynnpack():
  """The stem's convolution and both its gradients are XLA's own kernels with the options; by default YNNPACK
  takes them (much slower on some CPUs), so the check would fail if the option stopped meaning that."""
  x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))  # YNNPACK passes over smaller ones

  def conv_grads(x, w):
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1))(x, w)

  def compiled_text(options):
    return jax.jit(conv_grads, compiler_options=options).lower(x, w).compile().as_text()

  assert "__ynn_fusion" in compiled_text({})
  assert compiled_text(xla_cpu.compiler_options("default")) == compiled_text({})
  ours = compiled_text(xla_cpu.compiler_options())
  assert "__ynn_fusion" not in ours and ours.count(" convolution(") == 2  # forward is dead code: dx and dW only


def test_onednn_eval_logits_match_timm():
  """The CPU-tuned inference graph compiles with every plain dot in oneDNN (its fused form crashed on it) and stays
  exact."""
  reference = randomised_timm_volo("volo_d1")
  images = nhwc_batch(2, 224)
  model = converted_volo(reference, "volo_d1")
  kernels.use_cpu_kernels(model, "onednn")
  model.eval()
  graphdef, state = nnx.split(model)
  forward = xla_cpu.jit(lambda s, x: nnx.merge(graphdef, s)(x), dots="onednn")
  compiled = forward.lower(state, jnp.asarray(images)).compile()
  assert "__onednn_fusion" in compiled.as_text()  # the option names still mean something to this XLA
  assert relative_error(compiled(state, jnp.asarray(images)), torch_logits(reference, images)) <= 1e-4


@pytest.mark.slow
def test_onednn_train_gradients_match_timm():
  """Every parameter's gradient of a train-mode loss (BatchNorm on batch statistics), CPU-tuned with the backward's
  products in oneDNN, against PyTorch autograd."""
  reference = randomised_timm_volo("volo_d1", num_classes=10).train()
  images = nhwc_batch(2, 224, seed=5)
  cotangent = np.random.default_rng(6).standard_normal((2, 10)).astype(np.float32)
  model = converted_volo(reference, "volo_d1")  # before PyTorch's forward updates its running statistics
  kernels.use_cpu_kernels(model, "onednn")
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def param_grads(params, rest, x):
    return nnx.grad(lambda m: jnp.vdot(m(x), cotangent))(nnx.merge(graphdef, params, rest))

  grad = xla_cpu.jit(param_grads, dots="onednn")
  compiled = grad.lower(params, rest, jnp.asarray(images)).compile()
  assert "__onednn_fusion" in compiled.as_text()
  nnx.update(model, compiled(params, rest, jnp.asarray(images)))  # the model now holds the gradients
  ours = state_dict(model)
  tokens = reference.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
  (reference.head(tokens[:, 0]) * torch.from_numpy(cotangent)).sum().backward()  # train mode: class head only
  checked = 0
  for name, p in reference.named_parameters():
    if p.grad is not None:  # the aux head is unused
      # The stem's convolutions feed BatchNorm over 2 images: their gradients are near-cancelling sums, off by
      # up to 8e-3 of their largest element with XLA's default dots too.
      bound = 2e-2 if name.startswith("patch_embed.") else 1e-4
      assert relative_error(ours[name], p.grad.numpy()) <= bound, name
      checked += 1
  assert checked == len(list(reference.parameters())) - 2
