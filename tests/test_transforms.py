"""Our TF transforms against timm's (PIL/torchvision) on real photos shipped with scikit-learn."""

import numpy as np
import pytest

from torch_reference import torch  # noqa: F401  (skips without the PyTorch stack; loads torchvision before TF)
import timm.data  # noqa: E402  pylint: disable=wrong-import-order
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-order
from PIL import Image  # noqa: E402  pylint: disable=wrong-import-order
from sklearn.datasets import load_sample_image  # noqa: E402  pylint: disable=wrong-import-order

from volo_jax.data import augment, transforms  # noqa: E402


@pytest.mark.parametrize("photo", ["china.jpg", "flower.jpg"])
@pytest.mark.parametrize("img_size,crop_pct", [(224, 0.96), (384, 1.0), (224, 1.15)])
def test_eval_transform_matches_timm(photo, img_size, crop_pct):
  image = load_sample_image(photo)
  reference = timm.data.create_transform(input_size=img_size, is_training=False, crop_pct=crop_pct,
                                         interpolation="bicubic")
  expected = reference(Image.fromarray(image)).permute(1, 2, 0).numpy()
  ours = transforms.eval_transform(tf.constant(image), img_size, crop_pct).numpy()
  assert ours.shape == expected.shape
  mean_diff = np.abs(ours - expected).mean()
  print(f"{photo} {img_size} crop {crop_pct}: mean |Δ| = {mean_diff:.4f} (normalised units)")
  assert mean_diff < 0.02  # resampling kernels differ slightly between PIL and TF; geometry must be identical


def test_random_resized_crop_window_distribution_matches_timm():
  import torchvision.transforms as T  # pylint: disable=import-outside-toplevel
  height, width, n = 427, 640, 3000
  torch.manual_seed(0)
  theirs = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                     for _ in range(n)])
  windows = tf.data.Dataset.range(n).map(
      lambda i: tf.stack(augment.random_resized_crop_window(tf.stack([tf.constant(0, tf.int64), i]), height, width)))
  ours = np.stack(list(windows.as_numpy_iterator()))
  for label, stats in (("ours", ours), ("timm", theirs)):
    top, left, h, w = stats.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all(), label
  area = lambda s: (s[:, 2] * s[:, 3]) / (height * width)  # noqa: E731
  aspect = lambda s: np.log(s[:, 3] / s[:, 2])  # noqa: E731
  assert abs(area(ours).mean() - area(theirs).mean()) < 0.02
  assert abs(aspect(ours).mean() - aspect(theirs).mean()) < 0.03
  assert abs(np.median(ours[:, 0] + ours[:, 2] / 2) - np.median(theirs[:, 0] + theirs[:, 2] / 2)) < 10


def test_random_erasing_statistics_match_timm():
  from timm.data.random_erasing import RandomErasing  # pylint: disable=import-outside-toplevel
  n, size = 2000, 32
  eraser = RandomErasing(probability=0.25, mode="pixel", device="cpu")
  torch.manual_seed(0)
  theirs = np.array([(eraser(torch.full((3, size, size), 100.0)) != 100.0).float().mean().item()
                     for _ in range(n)])
  fractions = tf.data.Dataset.range(n).map(lambda i: tf.reduce_mean(tf.cast(augment.random_erasing(
      tf.fill((size, size, 3), 100.0), tf.stack([tf.constant(1, tf.int64), i])) != 100.0, tf.float32)))
  ours = np.array(list(fractions.as_numpy_iterator()))
  assert abs((ours > 0).mean() - 0.25) < 0.03 and abs((theirs > 0).mean() - 0.25) < 0.03
  assert abs(ours[ours > 0].mean() - theirs[theirs > 0].mean()) < 0.02
  assert ours.max() <= 1 / 3 + 0.05
