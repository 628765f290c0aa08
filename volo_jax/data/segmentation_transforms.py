"""mmsegmentation's (0.x) segmentation train and test transforms in TF graph ops for tf.data: keep-ratio resize,
random crop with cat_max_ratio, flip, photometric distortion, normalise and pad, with stateless per-example seeds
(a resumed run sees exactly the crops an uninterrupted one would)."""

import math

import tensorflow as tf

from volo_jax.data.transforms import normalize

IGNORE_INDEX = 255
CROP_ATTEMPTS = 10  # mmseg RandomCrop: up to 10 checked draws, then one more unchecked


def keep_ratio_size(height, width, scale):
  """mmcv rescale_size with keep_ratio: the factor min(max(scale) / max(h, w), min(scale) / min(h, w)) and
  new sizes int(x · factor + 0.5), computed in float64 as Python does. Returns (new_h, new_w) int32 tensors."""
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale_a, scale_b = tf.cast(scale[0], tf.float64), tf.cast(scale[1], tf.float64)
  factor = tf.minimum(tf.maximum(scale_a, scale_b) / tf.maximum(h, w),
                      tf.minimum(scale_a, scale_b) / tf.minimum(h, w))
  return tf.cast(tf.floor(h * factor + 0.5), tf.int32), tf.cast(tf.floor(w * factor + 0.5), tf.int32)


def scale_canvas(canvas: tuple[int, int], s: float, crop: int) -> tuple[int, int]:
  """The fixed input shape for test scale s: (max(crop, ceil(Hc · s)), max(crop, ceil(Wc · s))) as Python ints
  (the 1e-9 keeps a product like 100 · 0.7 = 70.000…01 at 70)."""
  return tuple(max(crop, math.ceil(side * s - 1e-9)) for side in canvas)


def resize_image(image: tf.Tensor, size) -> tf.Tensor:
  """cv2.INTER_LINEAR as mmcv.imresize: bilinear, half-pixel centres, no antialias; rounded back to uint8."""
  resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=False)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def resize_label(label: tf.Tensor, size) -> tf.Tensor:
  """cv2.INTER_NEAREST as mmcv.imresize(interpolation='nearest'): source index floor(i · src / dst), in integers.
  (tf.image.resize's 'nearest' samples at half-pixel centres, floor((i + 0.5) · src / dst), a different pixel.)"""
  shape = tf.shape(label)
  rows = tf.range(size[0]) * shape[0] // size[0]  # (new_h,)
  cols = tf.range(size[1]) * shape[1] // size[1]  # (new_w,)
  return tf.gather(tf.gather(label, rows, axis=0), cols, axis=1)


def _fit_canvas(height, width, size_h, size_w, canvas):
  """Our rule for a fixed test shape: a size larger than the canvas is replaced by the original image rescaled by
  min(Hc / H, Wc / W) (keep ratio, rounded as mmcv, clamped to the canvas)."""
  fits = (size_h <= canvas[0]) & (size_w <= canvas[1])
  factor = tf.minimum(canvas[0] / tf.cast(height, tf.float64), canvas[1] / tf.cast(width, tf.float64))
  fit_h = tf.minimum(tf.cast(tf.floor(tf.cast(height, tf.float64) * factor + 0.5), tf.int32), canvas[0])
  fit_w = tf.minimum(tf.cast(tf.floor(tf.cast(width, tf.float64) * factor + 0.5), tf.int32), canvas[1])
  return tf.where(fits, size_h, fit_h), tf.where(fits, size_w, fit_w)


def crop_draws(seed, height, width, crop: int) -> tf.Tensor:
  """mmseg RandomCrop.get_crop_bbox drawn CROP_ATTEMPTS + 1 times: (11, 2) int32 (top, left), each uniform in
  [0, max(side − crop, 0)]."""
  margins = tf.cast(tf.maximum(tf.stack([height, width]) - crop, 0), tf.float64)  # (2,)
  uniform = tf.random.stateless_uniform((CROP_ATTEMPTS + 1, 2), seed, dtype=tf.float64)
  return tf.cast(tf.minimum(tf.floor(uniform * (margins + 1.0)), margins), tf.int32)


def _balanced(label_crop: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
  """mmseg's acceptance: more than one class besides 255, the most frequent under cat_max_ratio of them."""
  counts = tf.math.bincount(tf.reshape(label_crop, [-1]), minlength=IGNORE_INDEX + 1, maxlength=IGNORE_INDEX + 1)
  counts = counts[:IGNORE_INDEX]  # (255,) the classes, ignore dropped
  total = tf.reduce_sum(counts)
  share = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(tf.maximum(total, 1), tf.float64)
  return (tf.math.count_nonzero(counts) > 1) & (share < cat_max_ratio)


def chosen_crop(label: tf.Tensor, draws: tf.Tensor, crop: int, cat_max_ratio: float) -> tf.Tensor:
  """Index into `draws` of mmseg's crop: the first of the first 10 whose int32 label crop is balanced, else the
  11th; the first when cat_max_ratio ≥ 1 (no check). The crops are checked one at a time, stopping at the first."""
  if cat_max_ratio >= 1.0:
    return tf.constant(0)

  def rejected(i):
    top, left = draws[i, 0], draws[i, 1]
    return tf.cond(i < CROP_ATTEMPTS,
                   lambda: ~_balanced(label[top:top + crop, left:left + crop], cat_max_ratio),
                   lambda: tf.constant(False))

  return tf.while_loop(rejected, lambda i: (i + 1,), (tf.constant(0),))[0]


def _convert(image, alpha=1.0, beta=0.0):
  """mmseg PhotoMetricDistortion.convert on float images holding uint8 values: x · alpha + beta, clip, truncate."""
  return tf.floor(tf.clip_by_value(image * alpha + beta, 0.0, 255.0))


def _adjust_hsv(image, adjust):
  """Round trip through OpenCV's 8-bit HSV (hue 0–180, saturation and value 0–255, each rounded), `adjust`
  applied to (hue, saturation) on the way; back to RGB values rounded to integers."""
  hsv = tf.image.rgb_to_hsv(image / 255.0)
  hue = tf.math.floormod(tf.round(hsv[..., 0] * 180.0), 180.0)
  saturation = tf.round(hsv[..., 1] * 255.0)
  hue, saturation = adjust(hue, saturation)
  rgb = tf.image.hsv_to_rgb(tf.stack([hue / 180.0, saturation / 255.0, hsv[..., 2]], axis=-1))
  return tf.clip_by_value(tf.round(rgb * 255.0), 0.0, 255.0)


def photometric_distortion(image: tf.Tensor, seed) -> tf.Tensor:
  """mmseg PhotoMetricDistortion on uint8 RGB (H, W, 3), each step with p 0.5: brightness + U(−32, 32); contrast
  × U(0.5, 1.5) either first or last (one coin); saturation × U(0.5, 1.5) and hue + randint(−18, 18) (numpy's,
  so −18…17) in OpenCV's 0–180 units; clipped and truncated to uint8 after each, as mmseg. Returns uint8."""
  u = tf.unstack(tf.random.stateless_uniform((9,), seed, dtype=tf.float64))
  u = [tf.cast(x, tf.float32) for x in u]
  apply = lambda coin, fn, x: tf.cond(coin < 0.5, lambda: fn(x), lambda: x)
  contrast = lambda x: apply(u[3], lambda y: _convert(y, alpha=0.5 + u[4]), x)
  contrast_first = u[2] < 0.5
  hue_delta = tf.floor(u[8] * 36.0) - 18.0

  image = tf.cast(image, tf.float32)
  image = apply(u[0], lambda x: _convert(x, beta=-32.0 + 64.0 * u[1]), image)
  image = tf.cond(contrast_first, lambda: contrast(image), lambda: image)
  image = apply(u[5], lambda x: _adjust_hsv(x, lambda h, s: (h, _convert(s, alpha=0.5 + u[6]))), image)
  image = apply(u[7], lambda x: _adjust_hsv(x, lambda h, s: (tf.math.floormod(h + hue_delta, 180.0), s)), image)
  image = tf.cond(contrast_first, lambda: image, lambda: contrast(image))
  return tf.cast(image, tf.uint8)


def _pad(array, size, value):
  """Pads an (H, W) or (H, W, C) array bottom/right to `size` (Python ints) with `value`; static shape set."""
  shape = tf.shape(array)
  padding = [[0, size[0] - shape[0]], [0, size[1] - shape[1]]] + [[0, 0]] * (array.shape.rank - 2)
  padded = tf.pad(array, padding, constant_values=value)
  padded.set_shape(tuple(size) + tuple(array.shape[2:]))
  return padded


def train_transform(image: tf.Tensor, label: tf.Tensor, seed, *, crop: int, scale: tuple[int, int],
                    ratio_range: tuple[float, float], cat_max_ratio: float, hflip: float, photometric: bool) -> dict:
  """mmseg 0.x training pipeline on uint8 (H, W, 3) and train ids (H, W) (255 = ignore) with a (2,) stateless
  seed: Resize(scale, ratio_range, keep_ratio) → RandomCrop(crop², cat_max_ratio) → RandomFlip(hflip) →
  PhotoMetricDistortion (if photometric) → ImageNet normalise → pad to crop² (image 0, label 255).
  Returns {"image": float32 (crop, crop, 3), "label": int32 (crop, crop)}."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  label = tf.cast(label, tf.int32)
  ratio = tf.random.stateless_uniform((), seeds[0], ratio_range[0], ratio_range[1], dtype=tf.float64)
  goal = (tf.floor(scale[0] * ratio), tf.floor(scale[1] * ratio))  # mmseg: int(scale · ratio)
  shape = tf.shape(image)
  size = keep_ratio_size(shape[0], shape[1], goal)
  image, label = resize_image(image, size), resize_label(label, size)

  draws = crop_draws(seeds[1], size[0], size[1], crop)
  top_left = draws[chosen_crop(label, draws, crop, cat_max_ratio)]
  top, left = top_left[0], top_left[1]
  image, label = image[top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]

  flip = tf.random.stateless_uniform((), seeds[2]) < hflip
  image, label = tf.cond(flip, lambda: (tf.reverse(image, [1]), tf.reverse(label, [1])), lambda: (image, label))
  if photometric:
    image = photometric_distortion(image, seeds[3])
  image = normalize(image)
  return {"image": _pad(image, (crop, crop), 0.0), "label": _pad(label, (crop, crop), IGNORE_INDEX)}


def eval_transform(image: tf.Tensor, label: tf.Tensor, *, scale: tuple[int, int], canvas: tuple[int, int],
                   crop: int, test_scales: tuple[float, ...] = (1.0,)) -> dict:
  """mmseg's test input on fixed shapes, so that every batch has one: the label (train ids) resized nearest to the
  keep-ratio size for `scale` (shrunk to fit `canvas` when larger, see _fit_canvas) and padded with 255 to
  `canvas`; per test scale s, the original image resized bilinear to the size for (int(scale · s)) (same rule
  against scale_canvas(canvas, s, crop)), normalised, zero-padded to that canvas.
  Returns {"label": int32 canvas, "size": int32 (2,) = (h, w), "images": tuple of float32 (Hc_s, Wc_s, 3),
  "sizes": tuple of int32 (2,)}."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  size_h, size_w = _fit_canvas(height, width, *keep_ratio_size(height, width, scale), canvas)
  label = _pad(resize_label(tf.cast(label, tf.int32), (size_h, size_w)), canvas, IGNORE_INDEX)
  images, sizes = [], []
  for s in test_scales:
    canvas_s = scale_canvas(canvas, s, crop)
    scale_s = (int(scale[0] * s), int(scale[1] * s))
    h, w = _fit_canvas(height, width, *keep_ratio_size(height, width, scale_s), canvas_s)
    images.append(_pad(normalize(resize_image(image, (h, w))), canvas_s, 0.0))
    sizes.append(tf.stack([h, w]))
  return {"label": label, "size": tf.stack([size_h, size_w]), "images": tuple(images), "sizes": tuple(sizes)}
