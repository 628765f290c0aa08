"""timm's RandAugment ('rand-m9-mstd0.5-inc1') in TF ops with stateless randomness.

Images are float32 (H, W, 3) holding integer values in [0, 255], as the uint8 PIL images timm augments; every op
returns integer values again. Ops and level → argument maps follow timm.data.auto_augment ('increasing' set).
Affine ops sample bilinearly: TF's projective transform has no bicubic, so timm's random bilinear/bicubic
choice per op becomes bilinear always (a sub-level difference, see the tests).
"""

import math

import numpy as np
import tensorflow as tf

from volo_jax.data.transforms import channelwise, select

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm: round(255 · ImageNet mean)
OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor), truncated to uint8 values."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _grayscale(image):
  """PIL convert('L'): (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16, as (H, W, 1). The weighted sums are integers
  below 2²⁴, so the matmul is exact in float32."""
  shape = tf.shape(image)
  weighted = tf.matmul(tf.reshape(image, (-1, 3)), tf.constant([[19595.0], [38470.0], [7471.0]]))  # (H·W, 1)
  return tf.reshape(tf.floor((weighted + 32768.0) / 65536.0), tf.concat([shape[:2], [1]], 0))


def auto_contrast(image):
  channels = tf.transpose(tf.reshape(image, (-1, 3)))  # (3, H·W): reductions along the contiguous axis are faster
  lo, hi = tf.reduce_min(channels, axis=1), tf.reduce_max(channels, axis=1)
  stretch = hi > lo  # a flat channel stays as it is: scale 1, shift 0
  scale = tf.where(stretch, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  shift = tf.where(stretch, lo * scale, 0.0)
  return tf.clip_by_value(tf.floor(channelwise(lambda rows, a, b: rows * a - b, image, scale, shift)), 0.0, 255.0)


def equalize(image):
  """PIL ImageOps.equalize: per channel, a lookup table from the histogram (one histogram and one lookup for the
  three channels, their values offset by 256·channel)."""
  values = channelwise(tf.add, tf.cast(image, tf.int32), (0, 256, 512))  # (H, W, 3) indices into 3 × 256 bins
  hist = tf.reshape(tf.math.bincount(tf.reshape(values, [-1]), minlength=768, maxlength=768), (3, 256))
  last_used = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), axis=[1]), axis=1, output_type=tf.int32)
  step = (tf.reduce_sum(hist, axis=1) - tf.gather(hist, last_used, batch_dims=1)) // 255  # (3,)
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + step[:, None] // 2) // tf.maximum(step, 1)[:, None]
  lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None])  # (3, 256); identity if step is 0
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), values), tf.float32)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  """Keeps the top `bits` bits: floor(x / 2^(8−bits))·2^(8−bits), exact on integer values (8 bits: unchanged).
  A scalar shift, not a tf.where against the image, whose broadcast is slow (see docs/performance.md, 'Small
  RandAugment graph')."""
  shift = tf.pow(2.0, 8.0 - tf.cast(tf.minimum(bits, 8), tf.float32))
  return tf.floor(image / shift) * shift


def solarize(image, threshold):
  return select(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return select(image < threshold, tf.minimum(255.0, image + addition), image)


def color(image, factor):
  return _blend(tf.tile(_grayscale(image), (1, 1, 3)), image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3×3, centre 5, /13), whose border pixels are the input's."""
  shape = tf.shape(image)
  h, w = shape[0] - 2, shape[1] - 2
  # The 3×3 box sum, separably from shifted slices: integer sums, exact in float32, and faster than a depthwise
  # convolution (docs/performance.md, 'Small RandAugment graph').
  rows = image[0:h] + image[1:h + 1] + image[2:h + 2]  # (h, W, 3)
  window_sum = rows[:, 0:w] + rows[:, 1:w + 1] + rows[:, 2:w + 2]  # (h, w, 3)
  interior = image[1:1 + h, 1:1 + w]
  smooth = tf.floor(tf.clip_by_value((window_sum + 4.0 * interior) / 13.0, 0.0, 255.0) + 0.5)
  # The interior replaced by `smooth`, the border kept: integer differences, exact in float32.
  degenerate = image + tf.pad(smooth - interior, [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, factor)


# PIL's (a, b, c, d, e, f) → TF's projective transform (pixel centres at +½ in PIL, at integers in TF):
# (a, b, c + ½a + ½b − ½, d, e, f + ½d + ½e − ½, 0, 0), linear in (a, b, c, d, e, f, 1).
_PIL_TO_TF = np.array([
    [1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0], [0.5, 0.5, 1, 0, 0, 0, -0.5],
    [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0.5, 0.5, 1, -0.5],
    [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], np.float32)


def affine(image, coefficients):
  """PIL image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL): output pixel centre (x+½, y+½)
  samples input point (a·x' + b·y' + c, d·x' + e·y' + f); outside points take the fill colour."""
  tf_matrix = tf.linalg.matvec(_PIL_TO_TF, tf.concat([coefficients, [1.0]], 0))
  shifted = tf.raw_ops.ImageProjectiveTransformV3(
      images=channelwise(tf.subtract, image, FILL)[None], transforms=tf_matrix[None],
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  shifted.set_shape(image.shape)
  return tf.floor(tf.clip_by_value(channelwise(tf.add, shifted, FILL), 0.0, 255.0))


def _size(image):
  """(width, height): Python floats when the shape is static (the geometry table is then one constant)."""
  height, width = image.shape[0], image.shape[1]
  if height is not None and width is not None:
    return float(width), float(height)
  shape = tf.cast(tf.shape(image), tf.float32)
  return shape[1], shape[0]


def _signed_level(magnitude, negate):
  return tf.where(negate, -1.0, 1.0) * magnitude / MAX_LEVEL


def _geometry_table(width, height, translate_pct):
  """(6, 4, 6): per row (identity, then GEOMETRIC_OPS in order), the PIL coefficients' dependence on the terms
  (1, signed level, cos θ, sin θ). PIL's rotate turns counter-clockwise by θ about the centre (w/2, h/2); shears
  move by 0.3·level, translations by translate_pct·level of the image side. One constant when width and height
  are Python numbers, a few ops on them when they are tensors."""
  cx, cy = width / 2.0, height / 2.0
  identity, zero = [1.0, 0, 0, 0, 1.0, 0], [0, 0, 0, 0, 0, 0]
  return tf.convert_to_tensor([
      [identity, zero, zero, zero],
      [[0, 0, cx, 0, 0, cy], zero, [1.0, 0, -cx, 0, 1.0, -cy], [0, 1.0, -cy, -1.0, 0, cx]],  # Rotate
      [identity, [0, 0.3, 0, 0, 0, 0], zero, zero],  # ShearX
      [identity, [0, 0, 0, 0.3, 0, 0], zero, zero],  # ShearY
      [identity, [0, 0, translate_pct * width, 0, 0, 0], zero, zero],  # TranslateXRel
      [identity, [0, 0, 0, 0, 0, translate_pct * height], zero, zero],  # TranslateYRel
  ], tf.float32)


def geometry(op_index, magnitude, negate, width=1.0, height=1.0, translate_pct: float = 0.45):
  """PIL's affine coefficients (a, b, c, d, e, f), the map from output to input points, of op `op_index` on a
  width × height image; the identity for the colour ops. At the default 1 × 1 the points are normalised to the
  image (a square image), which is how the token-label targets follow the image's geometry."""
  level = _signed_level(magnitude, negate)
  angle = -(level * 30.0) * math.pi / 180.0  # PIL's rotate(degrees) in image coordinates (y down)
  terms = tf.stack([1.0, level, tf.cos(angle), tf.sin(angle)])
  row = [GEOMETRIC_OPS.index(name) + 1 if name in GEOMETRIC_OPS else 0 for name in OP_NAMES]
  return tf.linalg.matvec(tf.gather(_geometry_table(width, height, translate_pct), tf.gather(row, op_index)),
                          terms, transpose_a=True)


def op_matrix(op_index, magnitude, negate, translate_pct: float = 0.45):
  """`geometry` in normalised coordinates as a 3×3 matrix."""
  return tf.reshape(tf.concat([geometry(op_index, magnitude, negate, translate_pct=translate_pct),
                               [0.0, 0.0, 1.0]], 0), (3, 3))


def apply_op(image, op_index, magnitude, negate, translate_pct: float = 0.45):
  """timm's op `OP_NAMES[op_index]` at `magnitude` (0–10); `negate` flips the sign where timm randomly negates.

  The five geometric ops share one affine warp of their coefficients: TF's control flow costs time for every op
  in a branch not taken, so the branches are kept small (see docs/performance.md, 'Small RandAugment graph').
  """
  level = magnitude / MAX_LEVEL
  enhance = tf.maximum(0.1, 1.0 + _signed_level(magnitude, negate) * 0.9)
  colour_ops = {
      "AutoContrast": lambda: auto_contrast(image),
      "Equalize": lambda: equalize(image),
      "Invert": lambda: invert(image),
      "PosterizeIncreasing": lambda: posterize(image, 4 - tf.cast(tf.floor(level * 4), tf.int32)),
      "SolarizeIncreasing": lambda: solarize(image, 256.0 - tf.minimum(256.0, tf.floor(level * 256.0))),
      "SolarizeAdd": lambda: solarize_add(image, tf.minimum(128.0, tf.floor(level * 110.0))),
      "ColorIncreasing": lambda: color(image, enhance),
      "ContrastIncreasing": lambda: contrast(image, enhance),
      "BrightnessIncreasing": lambda: brightness(image, enhance),
      "SharpnessIncreasing": lambda: sharpness(image, enhance),
  }
  geometric = tf.reduce_any(tf.equal(op_index, [OP_NAMES.index(name) for name in GEOMETRIC_OPS]))
  out = tf.cond(
      geometric,
      lambda: affine(image, geometry(op_index, magnitude, negate, *_size(image), translate_pct)),
      lambda: tf.switch_case(op_index, [colour_ops.get(name, lambda: image) for name in OP_NAMES]))
  out.set_shape(image.shape)
  return out


def rand_augment(image, seed, *, num_layers: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5, with_matrix: bool = False):
  """timm RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with `prob` at a magnitude
  drawn from N(magnitude, magnitude_std) clipped to [0, 10]. with_matrix: also the 3×3 normalised output → input
  map of the geometric ops applied (`op_matrix`, composed), for the token-label targets."""
  matrix = tf.eye(3)
  # All layers' draws at once: a few random ops instead of four splits and draws per layer.
  seeds = tf.random.experimental.stateless_split(seed, 3)
  op_indices = tf.random.stateless_uniform((num_layers,), seeds[0], 0, len(OP_NAMES), dtype=tf.int32)
  levels = tf.clip_by_value(magnitude + magnitude_std * tf.random.stateless_normal((num_layers,), seeds[1]),
                            0.0, MAX_LEVEL)
  coins = tf.random.stateless_uniform((2, num_layers), seeds[2])
  draws = zip(tf.unstack(op_indices), tf.unstack(levels), tf.unstack(coins[0] < 0.5), tf.unstack(coins[1] < prob))
  for op_index, level, negate, use in draws:
    image = tf.cond(use,  # a cond, not a select: skipped ops cost nothing; it traces both lambdas right here
                    lambda: apply_op(image, op_index, level, negate), lambda: image)  # noqa: B023
    if with_matrix:  # this op samples the previous image: input = earlier maps ∘ this op's map
      matrix = tf.where(use, matrix @ op_matrix(op_index, level, negate), matrix)
  return (image, matrix) if with_matrix else image


def parse(spec: str) -> dict:
  """'rand-m9-mstd0.5-inc1' → rand_augment kwargs (only the increasing op set is implemented)."""
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"unsupported auto-augment {spec!r} (only timm's rand-… RandAugment)")
  kwargs, increasing = {}, False
  for part in parts[1:]:
    key = part.rstrip("0123456789.")
    value = part[len(key):]
    if key == "m":
      kwargs["magnitude"] = float(value)
    elif key == "mstd":
      kwargs["magnitude_std"] = float(value)
    elif key == "n":
      kwargs["num_layers"] = int(value)
    elif key == "p":
      kwargs["prob"] = float(value)
    elif key == "inc":
      increasing = bool(int(value))
    else:
      raise ValueError(f"unsupported RandAugment option {part!r} in {spec!r}")
  if not increasing:
    raise ValueError(f"{spec!r}: only the 'increasing' op set (inc1, VOLO's recipe) is implemented")
  return kwargs
