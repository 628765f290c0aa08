"""Mixup/CutMix against timm's Mixup(mode='batch') given the same λ and box."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_reference import torch
from timm.data import mixup as timm_mixup  # noqa: E402  pylint: disable=wrong-import-order
from volo_jax.train import mixup
from volo_jax.train.step import soft_targets


def _timm(images, labels, monkeypatch, *, lam, cutmix, center=None):
  monkeypatch.setattr(timm_mixup.np.random, "rand", lambda: 0.0 if cutmix else 0.99)
  monkeypatch.setattr(timm_mixup.np.random, "beta", lambda a, b: lam)
  if center is not None:
    draws = iter(center)
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda low, high, size=None: next(draws))
  mixer = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  x, y = mixer(x, torch.from_numpy(labels))
  return x.permute(0, 2, 3, 1).numpy(), y.numpy()


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  return rng.standard_normal((6, 20, 24, 3)).astype(np.float32), rng.integers(0, 10, 6)


def test_mixup_blend_equals_timm(batch, monkeypatch):
  images, labels = batch
  lam = 0.37
  expected_x, expected_y = _timm(images, labels, monkeypatch, lam=lam, cutmix=False)
  targets = soft_targets(jnp.asarray(labels), 10, 0.1)
  ours_x = lam * images + (1 - lam) * images[::-1]
  np.testing.assert_allclose(ours_x, expected_x, atol=1e-6)
  np.testing.assert_allclose(lam * targets + (1 - lam) * targets[::-1], expected_y, atol=1e-6)


def test_cutmix_box_and_corrected_lambda_equal_timm(batch, monkeypatch):
  images, labels = batch
  lam, cy, cx = 0.6, 15, 4
  expected_x, expected_y = _timm(images, labels, monkeypatch, lam=lam, cutmix=True, center=(cy, cx))
  with jax.disable_jit():  # draw our box with the same centre as the one timm drew
    keys = iter([cy, cx])
    monkeypatch.setattr(mixup.jax.random, "randint", lambda *args, **kwargs: next(keys))
    box = mixup.cutmix_box(jax.random.key(0), 20, 24, lam)
  ours_x, corrected = mixup.apply_cutmix(jnp.asarray(images), box)
  np.testing.assert_array_equal(ours_x, expected_x)
  targets = soft_targets(jnp.asarray(labels), 10, 0.1)
  np.testing.assert_allclose(corrected * targets + (1 - corrected) * targets[::-1], expected_y, atol=1e-6)


def test_mix_draws_boxes_like_timm_and_keeps_targets_normalised(batch):
  images, labels = batch
  targets = soft_targets(jnp.asarray(labels), 10, 0.1)
  lams = []
  for seed in range(200):
    mixed, mixed_targets = mixup.mix(jax.random.key(seed), jnp.asarray(images), targets, mixup_alpha=0.8,
                                     cutmix_alpha=1.0)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-5)
    lams.append(float(mixed_targets[0, labels[0]] - 0.01) / 0.9 if labels[0] != labels[-1] else np.nan)
  lams = np.array([x for x in lams if not np.isnan(x)])
  assert 0.35 < lams.mean() < 0.65 and lams.min() >= -1e-6 and lams.max() <= 1 + 1e-6
