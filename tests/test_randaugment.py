"""RandAugment ops one by one against timm's (PIL) implementation on a real photo."""

import numpy as np
import pytest

from torch_reference import torch  # noqa: F401  (skips without the PyTorch stack; loads torchvision before TF)
from timm.data import auto_augment  # noqa: E402  pylint: disable=wrong-import-order
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-order
from PIL import Image  # noqa: E402  pylint: disable=wrong-import-order
from sklearn.datasets import load_sample_image  # noqa: E402  pylint: disable=wrong-import-order

from volo_jax.data import randaugment  # noqa: E402

HPARAMS = {"translate_pct": 0.45, "img_mean": randaugment.FILL, "interpolation": Image.BILINEAR}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.fixture(scope="module")
def photo():
  image = Image.fromarray(load_sample_image("china.jpg")).resize((160, 112), Image.BICUBIC)
  return np.asarray(image)


def _timm_op(name, image, magnitude, negate, monkeypatch):
  # timm negates when random.random() > 0.5; pin that draw (and the apply draw, prob=1) to our choice.
  monkeypatch.setattr(auto_augment.random, "random", lambda: 0.9 if negate else 0.1)
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HPARAMS)
  return np.asarray(op(Image.fromarray(image)), np.float32)


@pytest.mark.parametrize("name", randaugment.OP_NAMES)
@pytest.mark.parametrize("magnitude,negate", [(9.0, False), (5.3, True)])
def test_op_matches_timm(name, magnitude, negate, photo, monkeypatch):
  expected = _timm_op(name, photo, magnitude, negate, monkeypatch)
  ours = randaugment.apply_op(tf.constant(photo, tf.float32), tf.constant(randaugment.OP_NAMES.index(name)),
                              tf.constant(magnitude), tf.constant(negate)).numpy()
  diff = np.abs(ours - expected)
  if name in GEOMETRIC:
    # Same geometry; PIL and TF blend the fill colour differently along the edge of the moved content
    # (for rotations that edge crosses the interior), so a thin line of pixels may differ by more than 2.
    inner = diff[2:-2, 2:-2]
    assert inner.mean() < 0.4 and np.mean(inner > 2) < 0.015, (inner.mean(), np.mean(inner > 2))
  else:
    assert diff.max() <= 1.0, diff.max()
    assert np.mean(diff > 0) < 0.02


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds(photo):
  image = tf.constant(photo, tf.float32)
  a = randaugment.rand_augment(image, tf.constant([3, 4], tf.int64)).numpy()
  b = randaugment.rand_augment(image, tf.constant([3, 4], tf.int64)).numpy()
  np.testing.assert_array_equal(a, b)
  outs = [randaugment.rand_augment(image, tf.constant([3, i], tf.int64)).numpy() for i in range(12)]
  unchanged = sum(np.array_equal(o, photo) for o in outs)
  assert 0 < unchanged < 12  # both ops skipped with probability 1/4
  assert all(o.min() >= 0 and o.max() <= 255 and np.array_equal(o, np.round(o)) for o in outs)


def test_parse_recipe_string():
  assert randaugment.parse("rand-m9-mstd0.5-inc1") == {"magnitude": 9.0, "magnitude_std": 0.5}
  with pytest.raises(ValueError, match="increasing"):
    randaugment.parse("rand-m9-mstd0.5")
