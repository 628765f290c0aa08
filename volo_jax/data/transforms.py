"""Image transforms in TF ops, matching timm's definitions (PIL/torchvision) as closely as TF allows, and two
elementwise helpers that avoid TF's slow kernels on (H, W, 3) images."""

import math

import numpy as np
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channelwise(fn, image: tf.Tensor, *vectors) -> tf.Tensor:
  """fn(image, *vectors) for per-channel vectors (C,), computed on the (H, W·C) view against the vectors tiled
  along a row, because TF's broadcast over a minor dimension of size 3 is slow (see docs/performance.md, 'Tiled
  channelwise'). With a static width and constant vectors the tiled rows are constants (fewer graph nodes to run
  per image)."""
  height, width, channels = image.shape
  if width is not None and channels is not None and all(isinstance(v, (tuple, list)) for v in vectors):
    rows = tf.reshape(image, (-1, width * channels))  # (H, W·C)
    tiled = [tf.constant(np.tile(np.asarray(v, image.dtype.as_numpy_dtype), width)) for v in vectors]
    return tf.reshape(fn(rows, *tiled), (-1 if height is None else height, width, channels))
  shape = tf.shape(image)
  rows = tf.reshape(image, tf.stack([shape[0], -1]))  # (H, W·C)
  tiled = [tf.tile(tf.cast(v, image.dtype), shape[1:2]) for v in vectors]  # (W·C,) each
  return tf.reshape(fn(rows, *tiled), shape)


def select(condition: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """tf.where for a condition and operands of one shape, through TF's v1 Select kernel: tf.where (SelectV2)
  takes its slow broadcasting path even for equal shapes (see docs/performance.md, 'TF select')."""
  return tf.raw_ops.Select(condition=condition, x=x, y=y)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """uint8/float [0, 255] (H, W, 3) → ImageNet-normalised float32."""
  image = tf.cast(image, tf.float32) / 255.0
  return channelwise(lambda rows, mean, std: (rows - mean) / std, image, IMAGENET_MEAN, IMAGENET_STD)


def resize_short_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision Resize(int): short side → size, long side → int(size · long / short); bicubic, antialiased
  like PIL when shrinking. Returns float32 in [0, 255]."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)
  new_h = tf.where(h <= w, float(size), tf.floor(size * h / short))
  new_w = tf.where(w <= h, float(size), tf.floor(size * w / short))
  resized = tf.image.resize(tf.cast(image, tf.float32), tf.cast(tf.stack([new_h, new_w]), tf.int32),
                            method="bicubic", antialias=True)
  return tf.clip_by_value(resized, 0.0, 255.0)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """torchvision CenterCrop: zero-pads first when the image is smaller, offsets int(round((h − size) / 2))."""
  shape = tf.shape(image)
  pad_h = tf.maximum(size - shape[0], 0)
  pad_w = tf.maximum(size - shape[1], 0)
  image = tf.pad(image, [[pad_h // 2, pad_h - pad_h // 2], [pad_w // 2, pad_w - pad_w // 2], [0, 0]])
  shape = tf.shape(image)
  top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2.0), tf.int32)
  return image[top:top + size, left:left + size]


def eval_transform(image: tf.Tensor, img_size: int, crop_pct: float) -> tf.Tensor:
  """timm eval: bicubic resize of the short side to floor(img_size / crop_pct), centre crop, normalise."""
  image = resize_short_side(image, math.floor(img_size / crop_pct))
  image = center_crop(image, img_size)
  image.set_shape((img_size, img_size, 3))
  return normalize(image)
