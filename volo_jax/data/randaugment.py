"""timm's RandAugment ('rand-m9-mstd0.5-inc1') in TF ops with stateless randomness.

Images are float32 (H, W, 3) holding integer values in [0, 255], as the uint8 PIL images timm augments; every op
returns integer values again. Ops and level → argument maps follow timm.data.auto_augment ('increasing' set).
Affine ops sample bilinearly: TF's projective transform has no bicubic, so timm's random bilinear/bicubic
choice per op becomes bilinear always (a sub-level difference, see the tests).
"""

import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm: round(255 · ImageNet mean)
OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor), truncated to uint8 values."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _grayscale(image):
  """PIL convert('L'): (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16."""
  r, g, b = tf.unstack(image, axis=-1)
  return tf.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def auto_contrast(image):
  lo = tf.reduce_min(image, axis=(0, 1))
  hi = tf.reduce_max(image, axis=(0, 1))
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor(image * scale - lo * scale), 0.0, 255.0)
  return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel):
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  equalized = tf.cast(tf.gather(tf.minimum(lut, 255), values), tf.float32)
  return tf.where(step > 0, equalized, channel)


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image):
  return 255.0 - image


def posterize(image, bits):
  shift = tf.pow(2.0, 8.0 - tf.cast(bits, tf.float32))
  return tf.where(bits >= 8, image, tf.floor(image / shift) * shift)


def solarize(image, threshold):
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return tf.where(image < threshold, tf.minimum(255.0, image + addition), image)


def color(image, factor):
  return _blend(_grayscale(image)[..., None], image, factor)


def contrast(image, factor):
  mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with PIL's SMOOTH filter (3×3, centre 5, /13), whose border pixels are the input's."""
  shape = tf.shape(image)
  h, w = shape[0] - 2, shape[1] - 2
  # The 3×3 box sum, separably from shifted slices: integer sums, exact in float32, faster than a depthwise conv.
  rows = image[0:h] + image[1:h + 1] + image[2:h + 2]  # (h, W, 3)
  window_sum = rows[:, 0:w] + rows[:, 1:w + 1] + rows[:, 2:w + 2]  # (h, w, 3)
  smooth = (window_sum + 4.0 * image[1:1 + h, 1:1 + w]) / 13.0
  smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0) + 0.5)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  rows = tf.range(shape[0])[:, None]
  cols = tf.range(shape[1])[None, :]
  interior = (rows > 0) & (rows < shape[0] - 1) & (cols > 0) & (cols < shape[1] - 1)
  degenerate = tf.where(interior[..., None], smooth, image)
  return _blend(degenerate, image, factor)


def affine(image, matrix):
  """PIL image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL): output pixel centre (x+½, y+½)
  samples input point (a·x' + b·y' + c, d·x' + e·y' + f); outside points take the fill colour."""
  a, b, c, d, e, f = matrix
  # PIL's continuous coordinates put pixel centres at +½; TF's transform puts them at integers.
  tf_matrix = tf.stack([a, b, c + 0.5 * a + 0.5 * b - 0.5, d, e, f + 0.5 * d + 0.5 * e - 0.5, 0.0, 0.0])
  fill = tf.constant(FILL, tf.float32)
  shifted = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=tf.cast(tf_matrix, tf.float32)[None], output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.floor(tf.clip_by_value(shifted + fill, 0.0, 255.0))


def rotate_matrix(width, height, degrees):
  """PIL Image.rotate(degrees): counter-clockwise about the image centre (w/2, h/2)."""
  cx, cy = width / 2.0, height / 2.0
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _size(image):
  shape = tf.cast(tf.shape(image), tf.float32)
  return shape[1], shape[0]


def rotate(image, degrees):
  return affine(image, rotate_matrix(*_size(image), degrees))


def shear_x(image, factor):
  return affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0))


def shear_y(image, factor):
  return affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0))


def translate_x_rel(image, fraction):
  return affine(image, (1.0, 0.0, fraction * _size(image)[0], 0.0, 1.0, 0.0))


def translate_y_rel(image, fraction):
  return affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * _size(image)[1]))


def _signed_level(magnitude, negate):
  return tf.where(negate, -1.0, 1.0) * magnitude / MAX_LEVEL


def op_matrix(op_index, magnitude, negate, translate_pct: float = 0.45):
  """The 3×3 map from output to input points, in coordinates normalised to the image ([0, 1]², a square
  image), of `apply_op`'s geometric ops (rotate, shear, translate); the identity for the colour ops. The
  token-label targets follow the image's geometry with it."""
  level = _signed_level(magnitude, negate)
  identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
  by_op = {"Rotate": rotate_matrix(1.0, 1.0, level * 30.0), "ShearX": (1.0, level * 0.3, 0.0, 0.0, 1.0, 0.0),
           "ShearY": (1.0, 0.0, 0.0, level * 0.3, 1.0, 0.0),
           "TranslateXRel": (1.0, 0.0, level * translate_pct, 0.0, 1.0, 0.0),
           "TranslateYRel": (1.0, 0.0, 0.0, 0.0, 1.0, level * translate_pct)}
  branches = [lambda m=by_op.get(name, identity): tf.cast(tf.stack([*m, 0.0, 0.0, 1.0]), tf.float32)
              for name in OP_NAMES]
  return tf.reshape(tf.switch_case(op_index, branches), (3, 3))


def apply_op(image, op_index, magnitude, negate, translate_pct: float = 0.45):
  """timm's op `OP_NAMES[op_index]` at `magnitude` (0–10); `negate` flips the sign where timm randomly negates."""
  level = magnitude / MAX_LEVEL
  sign = tf.where(negate, -1.0, 1.0)
  enhance = tf.maximum(0.1, 1.0 + sign * level * 0.9)
  ops = [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: invert(image),
      lambda: rotate(image, sign * level * 30.0),
      lambda: posterize(image, 4 - tf.cast(tf.floor(level * 4), tf.int32)),
      lambda: solarize(image, 256.0 - tf.minimum(256.0, tf.floor(level * 256.0))),
      lambda: solarize_add(image, tf.minimum(128.0, tf.floor(level * 110.0))),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: shear_x(image, sign * level * 0.3),
      lambda: shear_y(image, sign * level * 0.3),
      lambda: translate_x_rel(image, sign * level * translate_pct),
      lambda: translate_y_rel(image, sign * level * translate_pct),
  ]
  out = tf.switch_case(op_index, ops)
  out.set_shape(image.shape)
  return out


def rand_augment(image, seed, *, num_layers: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5, with_matrix: bool = False):
  """timm RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with `prob` at a magnitude
  drawn from N(magnitude, magnitude_std) clipped to [0, 10]. with_matrix: also the 3×3 normalised output → input
  map of the geometric ops applied (`op_matrix`, composed), for the token-label targets."""
  matrix = tf.eye(3)
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    s = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
    op_index = tf.random.stateless_uniform((), s[0], 0, len(OP_NAMES), dtype=tf.int32)
    level = tf.clip_by_value(magnitude + magnitude_std * tf.random.stateless_normal((), s[1]), 0.0, MAX_LEVEL)
    negate = tf.random.stateless_uniform((), s[2]) < 0.5
    use = tf.random.stateless_uniform((), s[3]) < prob
    image = tf.cond(use,  # a cond, not a select: skipped ops cost nothing
                    lambda: apply_op(image, op_index, level, negate), lambda: image)
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
