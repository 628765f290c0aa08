"""layers.conv2d: the patch-matmul convolution XLA:CPU uses (im2col from strided slices, row patches and shifted
row sums at stride 1, or a space-to-depth reshape for non-overlapping patches) equals XLA's native convolution,
values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from volo_jax.models import layers as L


@pytest.mark.parametrize("kernel,stride,padding,bias,size", [
    (7, 2, 3, False, 24), (3, 1, 1, False, 24), (5, 1, 2, True, 20), (4, 4, 0, True, 24), (2, 2, 0, True, 24),
    (4, 4, 0, False, 26)])  # the last: VALID drops the rows and columns a whole patch does not cover
def test_conv_as_patch_matmul_equals_native_convolution(kernel, stride, padding, bias, size):
  conv = nnx.Conv(8, 16, (kernel, kernel), strides=stride, use_bias=bias, rngs=nnx.Rngs(0),
                  padding=((padding, padding), (padding, padding)) if padding else "VALID")
  x = jax.random.normal(jax.random.key(1), (2, size, size, 8))
  graphdef, state = nnx.split(conv)

  def loss(state, x, as_matmul):
    out = L.conv2d(x, nnx.merge(graphdef, state), as_matmul=as_matmul)
    return (out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size).sum(), out

  (_, ours), ours_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x, True)
  (_, native), native_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x, False)
  assert ours.shape == native.shape
  np.testing.assert_allclose(ours, native, atol=1e-5 * float(jnp.abs(native).max()))
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(native_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()))
