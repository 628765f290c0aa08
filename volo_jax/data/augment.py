"""Train-time augmentation in TF ops with stateless randomness (each example's seed is derived from its position
in the stream, so a resumed run sees exactly the images an uninterrupted one would). Definitions follow timm:
RandomResizedCrop.get_params, RandomErasing(mode='pixel')."""

import math

import tensorflow as tf

from volo_jax.data.transforms import select


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval)


def _randint_inclusive(seed, low, high):
  """Python's random.randint(low, high) / torch.randint(low, high + 1)."""
  return low + tf.cast(tf.floor(_uniform(seed) * tf.cast(high - low + 1, tf.float32)), tf.int32)


def random_resized_crop_window(seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """timm RandomResizedCrop.get_params: the first of 10 random (area, log-aspect) draws that fits, else a centre
  crop clamped to the ratio range. Returns (top, left, h, w) as int32."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target_area = h_f * w_f * _uniform(seeds[0], (attempts,), scale[0], scale[1])
  aspect = tf.exp(_uniform(seeds[1], (attempts,), math.log(ratio[0]), math.log(ratio[1])))
  w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  in_ratio = w_f / h_f
  fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, h[first], fallback_h)
  crop_w = tf.where(found, w[first], fallback_w)
  top = tf.where(found, _randint_inclusive(seeds[2], 0, height - crop_h), (height - crop_h) // 2)
  left = tf.where(found, _randint_inclusive(seeds[3], 0, width - crop_w), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def resize_random_interpolation(image, size: int, seed):
  """timm's interpolation='random': bilinear or bicubic with equal chance (antialiased like PIL)."""
  image = tf.cast(image, tf.float32)
  bicubic = _uniform(seed) < 0.5
  resized = tf.cond(bicubic,
                    lambda: tf.image.resize(image, (size, size), method="bicubic", antialias=True),
                    lambda: tf.image.resize(image, (size, size), method="bilinear", antialias=True))
  return tf.clip_by_value(resized, 0.0, 255.0)


def random_flip(image, seed, probability: float = 0.5):
  """(image flipped left-right with `probability`, whether it was)."""
  flip = _uniform(seed) < probability
  return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image), flip


def random_erasing(image, seed, probability=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3, attempts=10):
  """timm RandomErasing(mode='pixel', max_count=1) on a normalised (H, W, C) image: with `probability`, one
  rectangle (first of 10 draws that fits) is replaced by N(0, 1) noise per pixel and channel. The box is drawn
  only for the images that are erased, as timm does, so the others skip that part of the graph."""
  seeds = tf.random.experimental.stateless_split(seed, 6)

  def erase():
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    area = tf.cast(height * width, tf.float32)
    target_area = area * _uniform(seeds[0], (attempts,), min_area, max_area)
    aspect = tf.exp(_uniform(seeds[1], (attempts,), math.log(min_aspect), math.log(1 / min_aspect)))
    h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (w < width) & (h < height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    found = tf.reduce_any(fits)  # no draw fits: nothing is erased (an empty box)
    h, w = tf.where(found, h[first], 0), tf.where(found, w[first], 0)
    top = _randint_inclusive(seeds[2], 0, height - h)
    left = _randint_inclusive(seeds[3], 0, width - w)
    # noise only for the box, then padded to the image size
    noise = tf.random.stateless_normal(tf.stack([h, w, shape[2]]), seeds[5], dtype=image.dtype)
    padding = [[top, height - top - h], [left, width - left - w], [0, 0]]
    box = tf.pad(tf.ones(tf.stack([h, w, shape[2]]), tf.bool), padding)
    out = select(box, tf.pad(noise, padding), image)
    out.set_shape(image.shape)
    return out

  return tf.cond(_uniform(seeds[4]) < probability, erase, lambda: image)
