"""UperNet (Xiao et al., arXiv 1807.10221) for VOLO, channels-last: the four-level pyramid built from VOLO's /8
and /16 maps, the UperNet decode head (PPM + FPN) and the auxiliary FCN head.

The heads follow mmsegmentation's UPerHead / FCNHead as ported by HF transformers (`UperNetHead`,
`UperNetFCNHead`); attribute names mirror transformers' so that weight conversion is a rename. Resampling has
PyTorch's semantics: bilinear with align_corners=False and no antialiasing, adaptive average pooling with
PyTorch's bins. BatchNorm is PyTorch's (momentum 0.1, eps 1e-5, unbiased running variance); under jit on a
sharded batch its statistics are the global batch's, as SyncBN's.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from volo_jax.models.dropout import dropout
from volo_jax.models.initializers import conv_kernel_init

BATCH_NORM_EPS = 1e-5
BATCH_NORM_MOMENTUM = 0.9  # PyTorch momentum 0.1
POOL_SCALES = (1, 2, 3, 6)
# mmcv ConvModule: kaiming-normal (fan_out, ReLU gain) convs; mmseg conv_seg: Normal(0, 0.01).
conv_module_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
classifier_init = nnx.initializers.normal(0.01)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices and weights of the two taps per output position of PyTorch's bilinear (align_corners=False) resize.

  Source position (i + 0.5)·in/out − 0.5 clamped at 0, in float32 as PyTorch computes it for float inputs; the
  upper tap clamped to the last row.
  """
  half = np.float32(0.5)
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + half) - half, np.float32(0))
  lower = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, src - lower


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  lower, upper, frac = _bilinear_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac.reshape(shape), x.dtype)
  return jnp.take(x, lower, axis=axis) * (1 - frac) + jnp.take(x, upper, axis=axis) * frac


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """(B, H, W, C) → (B, size[0], size[1], C) as `F.interpolate(mode='bilinear', align_corners=False)` (no
  antialiasing, unlike jax.image.resize): two taps per axis, gathered along H then W."""
  return _resize_axis(_resize_axis(x, 1, size[0]), 2, size[1])


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) averaging matrix of PyTorch's AdaptiveAvgPool along one axis: bin i covers
  [floor(i·in/out), ceil((i+1)·in/out))."""
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """(B, H, W, C) → (B, size[0], size[1], C) as `F.adaptive_avg_pool2d`, as two small averaging products."""
  rows = jnp.asarray(adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
  return jnp.einsum("Hh,Ww,bhwc->bHWc", rows, cols, x, precision=jax.lax.Precision.HIGHEST)


class BatchNorm(nnx.Module):
  """PyTorch's BatchNorm2d on (B, H, W, C): batch statistics in float32 normalise with the biased variance; the
  running variance moves towards the unbiased one (Flax's BatchNorm keeps the biased one). `model.eval()` /
  `model.train()` toggle `use_running_average`."""

  def __init__(self, features: int, *, rngs: nnx.Rngs):
    del rngs  # no random init; the argument keeps the layer's constructor like the others
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      mean = xf.mean(axis=(0, 1, 2))
      var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
      count = xf.size // xf.shape[-1]
      unbiased = var * (count / max(count - 1, 1))
      m = BATCH_NORM_MOMENTUM
      self.mean[...] = m * self.mean[...] + (1 - m) * mean
      self.var[...] = m * self.var[...] + (1 - m) * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + BATCH_NORM_EPS) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class ConvModule(nnx.Module):
  """conv (no bias) → BatchNorm → ReLU: mmcv's ConvModule, transformers' UperNetConvModule."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dtype, rngs: nnx.Rngs):
    pad = kernel_size // 2
    self.conv = nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                         use_bias=False, kernel_init=conv_module_init, dtype=dtype, rngs=rngs)
    self.batch_norm = BatchNorm(out_channels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.batch_norm(self.conv(x)))


def _classifier(channels: int, num_classes: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(channels, num_classes, (1, 1), kernel_init=classifier_init, dtype=dtype, rngs=rngs)


class Pyramid(nnx.Module):
  """VOLO's /8 and /16 maps → the /4, /8, /16, /32 levels UperNet reads, each keeping its own channel count.

  Ours, not the paper's (which does not say): the BEiT/ViT UperNet construction, /4 = a 2×2 stride-2 transposed
  conv of /8 (PyTorch's ConvTranspose2d layout and kernel init, zero bias), /32 = a 2×2 max-pool of /16. Another
  construction only needs the same call and `channels`.
  """

  def __init__(self, dim8: int, dim16: int, *, dtype, rngs: nnx.Rngs):
    self.channels = (dim8, dim8, dim16, dim16)
    # The parameters (and their PyTorch names) of a ConvTranspose2d; `upsample` computes it.
    self.up = nnx.ConvTranspose(dim8, dim8, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True,
                                kernel_init=conv_kernel_init, dtype=dtype, rngs=rngs)

  def __call__(self, x8: jax.Array, x16: jax.Array) -> list[jax.Array]:
    x32 = nnx.max_pool(x16, (2, 2), strides=(2, 2))
    return [self.upsample(x8), x8, x16, x32]

  def upsample(self, x8: jax.Array) -> jax.Array:
    """`self.up`'s transposed conv as one product and a reshape: with a 2×2 kernel at stride 2 each input pixel
    writes its own 2×2 output block. (B, h, w, C) → (B, 2h, 2w, C). XLA:CPU runs lax.conv_transpose as a dilated
    convolution far slower than this (docs/performance.md, 'Transposed conv as a product')."""
    dtype = self.up.dtype or x8.dtype
    kernel = self.up.kernel[...].astype(dtype)  # (2, 2, out, in): transpose_kernel's layout
    b, h, w, _ = x8.shape
    y = jnp.einsum("bhwc,ijoc->bhiwjo", x8.astype(dtype), kernel)  # (B, h, 2, w, 2, out)
    return y.reshape(b, 2 * h, 2 * w, -1) + self.up.bias[...].astype(dtype)


class UperNetHead(nnx.Module):
  """UperNet decode head over a pyramid (finest level first): PPM on the top level, laterals on the others,
  top-down sum, per-level 3×3 convs, all levels upsampled to the finest and fused, dropout, 1×1 classifier.

  dropout_rate: mmseg's 0.1 before the classifier; transformers' port has none (0 reproduces it in training).
  """

  def __init__(self, in_channels: Sequence[int], num_classes: int, *, channels: int = 512,
               pool_scales: Sequence[int] = POOL_SCALES, dropout_rate: float = 0.1, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.pool_scales = tuple(pool_scales)
    top = in_channels[-1]
    self.psp_modules = nnx.List([ConvModule(top, channels, 1, dtype=dtype, rngs=rngs) for _ in pool_scales])
    self.bottleneck = ConvModule(top + len(pool_scales) * channels, channels, 3, dtype=dtype, rngs=rngs)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, dtype=dtype, rngs=rngs) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, dtype=dtype, rngs=rngs)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, dtype=dtype, rngs=rngs)
    self.dropout = dropout(dropout_rate, rngs)
    self.classifier = _classifier(channels, num_classes, dtype, rngs)

  def _psp(self, x: jax.Array) -> jax.Array:
    """Pyramid pooling: (B, h, w, C) → (B, h, w, channels)."""
    size = x.shape[1:3]
    pooled = [resize_bilinear(conv(adaptive_avg_pool(x, (s, s))), size)
              for s, conv in zip(self.pool_scales, self.psp_modules)]
    return self.bottleneck(jnp.concatenate([x] + pooled, axis=-1))  # (B, h, w, C + scales·channels)

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: the pyramid's levels (B, h_i, w_i, C_i), finest first → logits (B, h_0, w_0, classes)."""
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
    laterals.append(self._psp(features[-1]))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the (already summed) coarser one
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(x, size) for x in outs[1:]]
    x = self.fpn_bottleneck(jnp.concatenate(outs, axis=-1))  # (B, h_0, w_0, levels·channels) → channels
    return self.classifier(self.dropout(x))


class FCNHead(nnx.Module):
  """The auxiliary head on one pyramid level: `num_convs` 3×3 conv+BN+ReLU, no input concat, dropout, 1×1
  classifier (mmseg's FCNHead, transformers' UperNetFCNHead; the latter has no dropout)."""

  def __init__(self, in_channels: int, num_classes: int, *, channels: int = 256, num_convs: int = 1,
               in_index: int = 2, dropout_rate: float = 0.1, dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_index = in_index
    self.convs = nnx.List([ConvModule(in_channels if i == 0 else channels, channels, 3, dtype=dtype, rngs=rngs)
                           for i in range(num_convs)])
    self.dropout = dropout(dropout_rate, rngs)
    self.classifier = _classifier(channels, num_classes, dtype, rngs)

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: the pyramid's levels → logits (B, h, w, classes) at level `in_index`'s resolution."""
    x = features[self.in_index]
    for conv in self.convs:
      x = conv(x)
    return self.classifier(self.dropout(x))
