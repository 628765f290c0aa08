"""The segmentation run's side of the input pipeline (data/pipeline.py keeps the sharding, resume positions,
dropping and stall detection): an example's image and label map decoded, its raw label values mapped to train
ids, then mmseg's train transform or the test-time canvases (data/segmentation_transforms.py)."""

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from volo_jax.data import segmentation_datasets, segmentation_transforms

LABEL = "segmentation"  # the label map's key once read (datasets name it their own way)


def source(config) -> segmentation_datasets.SegmentationSource:
  """The dataset's keys, classes, palette and label mapping (ConfigError for a dataset without one)."""
  return segmentation_datasets.source(config.data.dataset)


def decoders(config) -> dict:
  """TFDS decoders that keep the image and the label map encoded: they are decoded in the map, where a bad one
  is dropped and counted."""
  src = source(config)
  return {src.image_key: tfds.decode.SkipDecoding(), src.label_key: tfds.decode.SkipDecoding()}


def rename(config):
  """example → {'image': encoded image, 'segmentation': encoded label map}, whatever the dataset calls them."""
  src = source(config)
  return lambda example: {"image": example[src.image_key], LABEL: example[src.label_key]}


def _raw_label(example) -> tf.Tensor:
  """The stored label map (H, W) uint8, before the dataset's raw → train id table."""
  return tf.io.decode_png(example[LABEL], channels=1)[..., 0]


def _decode(example, config) -> tuple[tf.Tensor, tf.Tensor]:
  """(image (H, W, 3) uint8, label (H, W) uint8 train ids, 255 = ignore); the two must have one size."""
  image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
  raw = _raw_label(example)
  same = tf.reduce_all(tf.shape(image)[:2] == tf.shape(raw))
  with tf.control_dependencies([tf.debugging.Assert(same, ["the label map's size differs from the image's"])]):
    return tf.identity(image), source(config).train_ids(raw)


def decode_train(example, seed, config) -> dict:
  """mmseg's train pipeline on one example: {'image': (crop, crop, 3) float32, 'label': (crop, crop) int32}."""
  image, label = _decode(example, config)
  s = config.segmentation
  return segmentation_transforms.train_transform(
      image, label, seed, crop=config.model.img_size, scale=tuple(s.scale), ratio_range=tuple(s.ratio_range),
      cat_max_ratio=s.cat_max_ratio, hflip=config.data.hflip, photometric=s.photometric)


def decode_eval(example, config) -> dict:
  """The test-time input on fixed canvases (segmentation_transforms.eval_transform) with mask 1."""
  image, label = _decode(example, config)
  s = config.segmentation
  out = segmentation_transforms.eval_transform(image, label, scale=tuple(s.scale), canvas=tuple(s.eval_canvas),
                                               crop=config.model.img_size, test_scales=tuple(s.test_scales))
  return dict(out, mask=tf.constant(1.0))


def eval_padding(config) -> dict:
  """An example with mask 0 and only ignored labels, shaped like decode_eval's, to even out the processes."""
  s, crop = config.segmentation, config.model.img_size
  canvases = [segmentation_transforms.scale_canvas(tuple(s.eval_canvas), r, crop) for r in s.test_scales]
  return {"label": tf.fill(tuple(s.eval_canvas), 255), "size": tf.constant(list(s.eval_canvas), tf.int32),
          "images": tuple(tf.zeros((h, w, 3)) for h, w in canvases),
          "sizes": tuple(tf.constant([h, w], tf.int32) for h, w in canvases), "mask": tf.constant(0.0)}


def check_labels(config, examples: int = 8) -> None:
  """The first `examples` label maps of the train split hold only values the dataset defines (raw values outside
  them would silently train as 'ignore'): ConfigError naming them otherwise."""
  from volo_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (pipeline imports this module)
  from volo_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  src = source(config)
  ds = pipeline.builder(config).as_dataset(split=config.data.train_split, decoders=decoders(config))
  for example in ds.map(rename(config)).take(examples):
    raw = _raw_label(example).numpy()
    bad = src.invalid_values(raw)
    if len(bad):
      shown = ", ".join(str(int(v)) for v in np.asarray(bad)[:5])
      raise ConfigError(f"{config.data.dataset!r}: label maps hold values {shown} that are no class of its "
                        f"{src.num_classes} (0–{src.num_classes - 1}, or 255 = ignore)")

