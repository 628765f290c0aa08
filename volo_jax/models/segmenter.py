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


# ------------------------------------------------------------------- test time on fixed-shape canvases
# Evaluation pads every (resized) image to one canvas so that one compiled program scores the whole set; each
# image's own size, a traced (B, 2) int array, places its sliding windows exactly where mmseg places them.


def max_windows(extent: int, crop: int, stride: int) -> int:
  """Windows per axis that mmseg's grid needs for an image `extent` pixels long (at least one)."""
  return max(extent - crop + stride - 1, 0) // stride + 1


def _window_starts(size: jax.Array, crop: int, stride: int, count: int) -> tuple[jax.Array, jax.Array]:
  """size (B,) traced → (starts, used), each (B, count): window_boxes' starts along one axis, `used` False for the
  slots beyond the image's own grid."""
  grids = jnp.maximum(size - crop + stride - 1, 0) // stride + 1
  index = jnp.arange(count)
  starts = jnp.maximum(jnp.minimum(index * stride + crop, size[:, None]) - crop, 0)
  return starts, index[None, :] < grids[:, None]


def slide_canvas_logits(model: VoloUperNet, images: jax.Array, sizes: jax.Array, *, crop: int,
                        stride: int) -> jax.Array:
  """slide_logits for images padded to one canvas: images (B, Hc, Wc, 3), sizes (B, 2) each image's (h, w) →
  logits (B, Hc, Wc, classes), float32, valid inside each image's (h, w).

  Every image gets the windows mmseg's grid gives its own size; one scan step runs window slot i of the whole
  batch, so memory holds one batch of crop logits at a time. An image smaller than the crop is scored on its
  crop-sized window, zero padding included (mmseg would run the model at the smaller size).
  """
  b, height, width, _ = images.shape
  if height < crop or width < crop:
    raise ValueError(f"canvas {height}×{width} is smaller than the {crop} crop")
  ny, nx = max_windows(height, crop, stride), max_windows(width, crop, stride)
  ys, y_used = _window_starts(sizes[:, 0], crop, stride, ny)  # (B, ny)
  xs, x_used = _window_starts(sizes[:, 1], crop, stride, nx)  # (B, nx)
  slots = [(i, j) for i in range(ny) for j in range(nx)]
  starts_y = jnp.stack([ys[:, i] for i, _ in slots])  # (slots, B)
  starts_x = jnp.stack([xs[:, j] for _, j in slots])
  used = jnp.stack([y_used[:, i] & x_used[:, j] for i, j in slots]).astype(jnp.float32)  # (slots, B)
  graphdef, state = nnx.split(model)

  def cut(image, y, x):
    return jax.lax.dynamic_slice(image, (y, x, 0), (crop, crop, image.shape[-1]))

  def paste(canvas, window, y, x):
    return jax.lax.dynamic_update_slice(canvas, cut(canvas, y, x) + window, (y, x, 0))

  def add_window(carry, slot):
    total, count = carry
    y, x, weight = slot  # (B,) each
    windows = jax.vmap(cut)(images, y, x)  # (B, crop, crop, 3)
    logits = upernet.resize_bilinear(nnx.merge(graphdef, state)(windows), (crop, crop))  # (B, crop, crop, K)
    total = jax.vmap(paste)(total, logits * weight[:, None, None, None], y, x)
    count = jax.vmap(paste)(count, jnp.broadcast_to(weight[:, None, None, None], (b, crop, crop, 1)), y, x)
    return (total, count), None

  zeros = (jnp.zeros((b, height, width, model.num_classes), jnp.float32), jnp.zeros((b, height, width, 1)))
  (total, count), _ = jax.lax.scan(add_window, zeros, (starts_y, starts_x, used))
  return total / jnp.maximum(count, 1.0)


def flip_valid(x: jax.Array, widths: jax.Array) -> jax.Array:
  """x (B, H, W, C) mirrored left–right inside each image's first `widths` (B,) columns; the rest stays."""
  columns = jnp.arange(x.shape[2])[None, :]
  source = jnp.where(columns < widths[:, None], widths[:, None] - 1 - columns, columns)  # (B, W)
  return jnp.take_along_axis(x, source[:, None, :, None], axis=2)


def _taps(in_sizes: jax.Array, out_sizes: jax.Array, length: int):
  """Per-image bilinear taps (PyTorch's align_corners=False) from traced in/out sizes (B,) for `length` outputs."""
  out_index = jnp.arange(length, dtype=jnp.float32)[None, :]
  scale = in_sizes.astype(jnp.float32)[:, None] / out_sizes.astype(jnp.float32)[:, None]
  src = jnp.maximum(scale * (out_index + 0.5) - 0.5, 0.0)  # (B, length)
  lower = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_sizes[:, None] - 1)
  upper = jnp.minimum(lower + 1, in_sizes[:, None] - 1)
  return lower, upper, src - lower


def resize_valid(x: jax.Array, in_sizes: jax.Array, out_sizes: jax.Array, canvas: tuple[int, int]) -> jax.Array:
  """Each image's valid (h, w) region of x (B, H, W, C) resized bilinearly (PyTorch's rule) to its out size, on a
  (B, canvas[0], canvas[1], C) canvas; the canvas beyond the out size holds edge values, to be masked."""
  lower, upper, frac = _taps(in_sizes[:, 0], out_sizes[:, 0], canvas[0])  # (B, Hc)
  x = (jnp.take_along_axis(x, lower[:, :, None, None], axis=1) * (1 - frac)[:, :, None, None]
       + jnp.take_along_axis(x, upper[:, :, None, None], axis=1) * frac[:, :, None, None])  # (B, Hc, W, C)
  lower, upper, frac = _taps(in_sizes[:, 1], out_sizes[:, 1], canvas[1])  # (B, Wc)
  return (jnp.take_along_axis(x, lower[:, None, :, None], axis=2) * (1 - frac)[:, None, :, None]
          + jnp.take_along_axis(x, upper[:, None, :, None], axis=2) * frac[:, None, :, None])  # (B, Hc, Wc, C)


def predict_logits(model: VoloUperNet, images: tuple, sizes: tuple, base_size: jax.Array, canvas: tuple[int, int],
                   *, crop: int, stride: int, mode: str = "slide", flip: bool = False) -> jax.Array:
  """mmseg's test time on canvases: images[i] (B, Hc_i, Wc_i, 3) the image at test scale i with its valid sizes[i]
  (B, 2); base_size (B, 2) the image's size at scale 1 on the (Hc, Wc) `canvas` (the label's) → scores
  (B, Hc, Wc, K): logits for one scale without flip (the image's canvas must then be `canvas`), else the mean of
  the softmax probabilities over scales and flips (mmseg's aug_test), each resized to the base size.

  mode 'whole' runs the model on the whole canvas, which must then be the crop (the position embedding's grid).
  """
  def scores(image, size):
    if mode == "whole":
      return upernet.resize_bilinear(model(image), image.shape[1:3])
    return slide_canvas_logits(model, image, size, crop=crop, stride=stride)

  if len(images) == 1 and not flip and tuple(images[0].shape[1:3]) == tuple(canvas):
    return scores(images[0], sizes[0])
  total = 0.0
  for image, size in zip(images, sizes):
    for mirrored in (False, True) if flip else (False,):
      x = flip_valid(image, size[:, 1]) if mirrored else image
      logits = scores(x, size)
      if mirrored:
        logits = flip_valid(logits, size[:, 1])
      total = total + jax.nn.softmax(resize_valid(logits, size, base_size, canvas), axis=-1)
  return total / (len(images) * (2 if flip else 1))

