"""Outlook attention against timm's PyTorch op, and the unfold/fold pair against PyTorch's Unfold/Fold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import relative_error, torch
from volo_jax.convert.mapping import load_state_dict
from volo_jax.models.outlook import OutlookAttention, WindowGeometry, avg_pool_ceil, fold, unfold

F = torch.nn.functional


@pytest.mark.parametrize("height,width", [(13, 13), (14, 14), (7, 10), (28, 28)])
def test_unfold_fold_match_pytorch(height, width):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, height, width, 12)).astype(np.float32)
  g = WindowGeometry(height, width, 3, 2, 1, heads=3)
  ours = np.asarray(unfold(jnp.asarray(x), g))  # (B, h, w, heads, 9, hd)
  ref = F.unfold(torch.from_numpy(x).permute(0, 3, 1, 2), 3, padding=1, stride=2)  # (B, C·9, h·w)
  h, w = g.grid
  ref = ref.reshape(2, 3, 4, 9, h, w).permute(0, 4, 5, 1, 3, 2).numpy()
  np.testing.assert_array_equal(ours, ref)

  y = rng.standard_normal(ours.shape).astype(np.float32)
  ours_fold = np.asarray(fold(jnp.asarray(y), g))
  y_torch = torch.from_numpy(y).permute(0, 3, 5, 4, 1, 2).reshape(2, 12 * 9, h * w)
  ref_fold = F.fold(y_torch, (height, width), 3, padding=1, stride=2).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours_fold, ref_fold, atol=1e-5)


def test_fold_is_the_transpose_of_unfold():
  """<unfold(x), y> = <x, fold(y)>, and the custom VJPs equal autodiff of the plain ops."""
  g = WindowGeometry(13, 11, 3, 2, 1, heads=2)
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (2, 13, 11, 8))
  y = jax.random.normal(ky, unfold(x, g).shape)
  np.testing.assert_allclose(jnp.vdot(unfold(x, g), y), jnp.vdot(x, fold(y, g)), rtol=1e-5)
  grad_x = jax.grad(lambda x: jnp.vdot(unfold(x, g), y))(x)
  np.testing.assert_allclose(grad_x, fold(y, g), rtol=1e-6, atol=1e-6)
  grad_y = jax.grad(lambda y: jnp.vdot(fold(y, g), x))(y)
  np.testing.assert_allclose(grad_y, unfold(x, g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [13, 14, 7])
def test_avg_pool_ceil_mode(size):
  x = np.random.default_rng(1).standard_normal((2, size, size + 1, 5)).astype(np.float32)
  ref = F.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2, ceil_mode=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(avg_pool_ceil(jnp.asarray(x), 2)), ref, atol=1e-6)


@pytest.mark.parametrize("height,width", [(13, 13), (14, 14), (9, 12)])
def test_outlook_attention_matches_timm(height, width):
  from timm.models.volo import OutlookAttention as TorchOutlook  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  ref = TorchOutlook(48, 4, kernel_size=3, padding=1, stride=2).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.normal_(0, 0.2)
  ours = OutlookAttention(48, 4, rngs=nnx.Rngs(0))
  load_state_dict(ours, {k: v.numpy() for k, v in ref.state_dict().items()})
  x = np.random.default_rng(2).standard_normal((2, height, width, 48)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x)).numpy()
  assert relative_error(ours(jnp.asarray(x)), expected) < 1e-5

  # Gradients too: input and the value projection, against PyTorch autograd.
  xt = torch.from_numpy(x).requires_grad_()
  ref(xt).pow(2).sum().backward()
  grads = nnx.grad(lambda m, x: (m(x) ** 2).sum(), argnums=(0, 1))(ours, jnp.asarray(x))
  assert relative_error(grads[1], xt.grad.numpy()) < 1e-4
  assert relative_error(grads[0].v.kernel[...], ref.v.weight.grad.numpy().T) < 1e-4


def test_no_gather_or_scatter_in_compiled_training_step():
  """The unfold/fold formulation must compile to slices/pads only, forward and backward."""
  layer = OutlookAttention(24, 2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return (nnx.merge(graphdef, state)(x) ** 2).sum()

  x = jnp.ones((2, 13, 13, 24))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()
  for op in ("scatter", "gather", "convolution"):
    assert f" {op}(" not in hlo, f"{op} in the compiled outlook attention"
