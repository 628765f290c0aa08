"""Any image encoding in the input pipeline: JPEG keeps the fused decode-and-crop, PNG (and GIF, BMP) decode whole
and are cropped with the same box, augmentation and seeds; a PNG/JPEG dataset trains with nothing skipped."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import digits
from volo_jax.data import digits_folder, folder, pipeline


def _photo(height=61, width=47) -> np.ndarray:
  """Smooth colour gradients with a few edges: exercises the crop box and every channel."""
  y, x = np.mgrid[0:height, 0:width]
  image = np.stack([(x * 5) % 256, (y * 4) % 256, ((x + y) * 3 + 100 * (x > width // 2)) % 256], axis=-1)
  return image.astype(np.uint8)


def _augmenting_config():
  config = digits.get_config()
  config.model.img_size = 32
  config.data.crop_scale = (0.08, 1.0)
  config.data.hflip = 0.5
  config.data.randaugment = "rand-m9-mstd0.5-inc1"
  config.data.random_erase = 0.25
  config.data.crop_pct = 0.875
  return config


def test_jpeg_and_png_of_the_same_pixels_give_the_same_train_and_eval_images():
  # Full-resolution chroma: the fused decode-and-crop then equals decoding the whole JPEG and cropping it (with 4:2:0
  # subsampling the chroma upsampling at the crop's edges differs).
  jpeg = tf.io.encode_jpeg(_photo(), quality=90, chroma_downsampling=False)
  pixels = tf.io.decode_jpeg(jpeg, channels=3)  # what the JPEG path sees, re-encoded losslessly
  png = tf.io.encode_png(pixels)
  assert bool(tf.io.is_jpeg(jpeg)) and not bool(tf.io.is_jpeg(png))
  config = _augmenting_config()
  for i in range(12):  # different crop boxes, flips and RandAugment ops
    seed = tf.constant([3, i], tf.int64)
    a = pipeline.decode_train({"image": jpeg, "label": tf.constant(1)}, seed, config)
    b = pipeline.decode_train({"image": png, "label": tf.constant(1)}, seed, config)
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())
  a = pipeline._decode_eval({"image": jpeg, "label": tf.constant(1)}, config)  # pylint: disable=protected-access
  b = pipeline._decode_eval({"image": png, "label": tf.constant(1)}, config)  # pylint: disable=protected-access
  np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_png_gif_and_bmp_decode_for_training(fmt):
  buffer = io.BytesIO()
  Image.fromarray(_photo()).save(buffer, format=fmt)
  out = pipeline.decode_train({"image": buffer.getvalue(), "label": tf.constant(0)}, tf.constant([0, 1], tf.int64),
                              _augmenting_config())
  assert out["image"].shape == (32, 32, 3) and np.isfinite(out["image"].numpy()).all()


def test_a_png_and_jpeg_folder_dataset_trains_with_nothing_skipped(tmp_path):
  images = str(tmp_path / "digits")
  digits_folder.write_digits_folder(images, classes=3)
  folder.write_dataset(images, "png_jpeg_digits", str(tmp_path / "data"), log=lambda _: None)
  config = digits.get_config()
  config.data.dataset, config.data.data_dir = "png_jpeg_digits", str(tmp_path / "data")
  config.data.eval_split = "validation"
  batches = pipeline.train_dataset(config, local_batch=64, start_step=0, process_index=0, process_count=1)
  info = pipeline.dataset_info(config)
  labels = []
  for _ in range(-(-info.num_train // 64) + 1):  # more than an epoch: every PNG and JPEG example went through
    labels.append(next(batches)["label"])
  assert batches.skipped == 0
  assert set(np.concatenate(labels)) == {0, 1, 2}
  eval_batches, num_batches = pipeline.eval_dataset(config, local_batch=64, process_index=0, process_count=1)
  assert sum(int(b["mask"].sum()) for b in eval_batches) == info.num_eval
