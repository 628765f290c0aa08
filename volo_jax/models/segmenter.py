"""VOLO + UperNet for semantic segmentation as one NNX module: the backbone's /8 and /16 maps, the built pyramid,
the UperNet decode head and the auxiliary FCN head (the paper's transfer claim; its code was never released)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from volo_jax.models import upernet
from volo_jax.models.volo import VARIANTS, VOLO, parse_model_name

AUX_LEVEL = 2  # the /16 level, as mmseg's transformer-backbone configs


class VoloUperNet(nnx.Module):
  """VOLO backbone → Pyramid → UperNetHead (+ FCNHead on the /16 level for the training loss), NHWC.

  `model(images)` gives the decode head's logits at /4, float32; the loss and the evaluation resize them to the
  label size (bilinear, `upernet.resize_bilinear`), as mmseg does, which keeps the largest tensor out of the
  model. The backbone has no class-attention blocks or class token: they would be parameters nothing trains.
  """

  def __init__(self, variant_name: str, num_classes: int, *, img_size: int | tuple[int, int] = 512,
               channels: int = 512, aux_channels: int = 256, pool_scales=upernet.POOL_SCALES,
               dropout_rate: float = 0.1, drop_path_rate: float = 0.0, scan_blocks: bool = False,
               remat: str = "none", dtype=jnp.float32, rngs: nnx.Rngs):
    variant = VARIANTS[variant_name]
    self.num_classes = num_classes
    self.backbone = VOLO(variant, img_size=img_size, num_classes=0, drop_path_rate=drop_path_rate,
                         scan_blocks=scan_blocks, remat=remat, dtype=dtype, rngs=rngs)
    del self.backbone.post_network, self.backbone.cls_token  # the classification path, unused here
    self.neck = upernet.Pyramid(variant.embed_dims[0], variant.embed_dims[-1], dtype=dtype, rngs=rngs)
    self.decode_head = upernet.UperNetHead(self.neck.channels, num_classes, channels=channels,
                                           pool_scales=pool_scales, dropout_rate=dropout_rate, dtype=dtype,
                                           rngs=rngs)
    self.auxiliary_head = upernet.FCNHead(self.neck.channels[AUX_LEVEL], num_classes, channels=aux_channels,
                                          in_index=AUX_LEVEL, dropout_rate=dropout_rate, dtype=dtype, rngs=rngs)

  def pyramid(self, images: jax.Array) -> list[jax.Array]:
    """images (B, H, W, 3) → the /4, /8, /16, /32 maps (B, H/s, W/s, C_s)."""
    return self.neck(*self.backbone.forward_stage_maps(images))

  def __call__(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, 3) → logits (B, H/4, W/4, classes), float32."""
    return self.decode_head(self.pyramid(images)).astype(jnp.float32)

  def forward_train(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images → (decode logits (B, H/4, W/4, classes), aux logits (B, H/16, W/16, classes)), float32."""
    features = self.pyramid(images)
    return (self.decode_head(features).astype(jnp.float32),
            self.auxiliary_head(features).astype(jnp.float32))


def create_segmenter(name: str, num_classes: int, *, img_size: int | tuple[int, int] = 512, seed: int = 0,
                     **kwargs) -> VoloUperNet:
  """`volo_d1` … `volo_d5` (a timm-style size suffix is accepted and ignored: img_size is the crop, a multiple of
  16) + UperNet with freshly initialised parameters; kwargs go to VoloUperNet."""
  variant_name, _ = parse_model_name(name)
  return VoloUperNet(variant_name, num_classes, img_size=img_size, rngs=nnx.Rngs(seed), **kwargs)


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int]]:
  """Top-left corners of mmseg's sliding windows over an image of at least crop × crop: a grid of `stride` steps,
  the last row and column pulled back to end at the image's edge."""
  def starts(size):
    grids = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]
  return [(y, x) for y in starts(height) for x in starts(width)]


def slide_logits(model: VoloUperNet, images: jax.Array, crop: int, stride: int) -> jax.Array:
  """mmseg's slide inference: images (B, H, W, 3) with H, W ≥ crop → logits (B, H, W, classes), float32, the
  mean over the windows covering each pixel of each window's logits resized to the crop (bilinear).

  All windows run as one batch; pad smaller images to the crop first (the position embedding is the crop's).
  """
  b, height, width, _ = images.shape
  if height < crop or width < crop:
    raise ValueError(f"image {height}×{width} is smaller than the {crop} crop: pad it first")
  boxes = window_boxes(height, width, crop, stride)
  windows = jnp.concatenate([images[:, y:y + crop, x:x + crop] for y, x in boxes])  # (windows·B, crop, crop, 3)
  logits = upernet.resize_bilinear(model(windows), (crop, crop))  # (windows·B, crop, crop, classes)
  total = jnp.zeros((b, height, width, logits.shape[-1]), jnp.float32)
  count = np.zeros((height, width, 1), np.float32)
  for i, (y, x) in enumerate(boxes):
    total = total.at[:, y:y + crop, x:x + crop].add(logits[i * b:(i + 1) * b])
    count[y:y + crop, x:x + crop] += 1
  return total / jnp.asarray(count)
