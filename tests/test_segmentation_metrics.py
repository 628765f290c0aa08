"""Segmentation loss against torch (F.interpolate + F.cross_entropy with ignore_index 255) and the confusion-matrix
metrics against an independent numpy computation (mmseg's per-class intersection and union)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from torch_reference import torch
from volo_jax import segmentation_metrics as sm

F = torch.nn.functional
CLASSES = 7


def _labels(shape, rng, ignore_fraction=0.2) -> np.ndarray:
  labels = rng.integers(0, CLASSES, shape).astype(np.int32)
  labels[rng.random(shape) < ignore_fraction] = 255
  return labels


def _torch_ce(logits: np.ndarray, labels: np.ndarray) -> float:
  up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=labels.shape[1:], mode="bilinear",
                     align_corners=False)
  return float(F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255))


@pytest.mark.parametrize("logit_size,label_size", [((8, 8), (32, 32)), ((6, 10), (24, 40)), ((5, 7), (17, 30))])
def test_loss_matches_torch(logit_size, label_size):
  rng = np.random.default_rng(sum(label_size))
  logits = rng.standard_normal((2, *logit_size, CLASSES), np.float32) * 3
  aux = rng.standard_normal((2, logit_size[0] // 2, logit_size[1] // 2, CLASSES), np.float32) * 3
  labels = _labels((2, *label_size), rng)
  expected = _torch_ce(logits, labels) + 0.4 * _torch_ce(aux, labels)
  ours = jax.jit(sm.segmentation_loss)(jnp.asarray(logits), jnp.asarray(aux), jnp.asarray(labels))
  np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
  np.testing.assert_allclose(float(sm.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))),
                             _torch_ce(logits, labels), rtol=1e-5)


def test_loss_gradient_matches_torch():
  """d loss / d logits through the resize (the gathers' transpose) and the masked mean, main and aux."""
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((2, 6, 10, CLASSES), np.float32)
  aux = rng.standard_normal((2, 3, 5, CLASSES), np.float32)
  labels = _labels((2, 24, 40), rng)
  ref = [torch.from_numpy(x).requires_grad_() for x in (logits, aux)]
  torch_labels = torch.from_numpy(labels).long()
  total = sum(w * F.cross_entropy(F.interpolate(x.permute(0, 3, 1, 2), size=(24, 40), mode="bilinear",
                                                align_corners=False), torch_labels, ignore_index=255)
              for w, x in zip((1.0, 0.4), ref))
  total.backward()
  grads = jax.grad(sm.segmentation_loss, argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(aux), jnp.asarray(labels))
  for ours, theirs in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(ours), theirs.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_loss_of_all_ignored_labels_is_zero():
  labels = jnp.full((1, 8, 8), 255, jnp.uint8)
  assert float(sm.cross_entropy(jnp.zeros((1, 4, 4, CLASSES)), labels)) == 0.0


def _numpy_scores(predictions, labels, valid):
  """mmseg's intersect_and_union, one image at a time, summed; then IoU, nan-mean, aAcc."""
  inter, area_pred, area_label = (np.zeros(CLASSES, np.int64) for _ in range(3))
  for p, lab, v in zip(predictions, labels, valid):
    keep = (lab != 255) & v
    p, lab = p[keep], lab[keep]
    inter += np.bincount(p[p == lab], minlength=CLASSES)
    area_pred += np.bincount(p, minlength=CLASSES)
    area_label += np.bincount(lab, minlength=CLASSES)
  union = area_pred + area_label - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = inter / union
  return iou, np.nanmean(iou), inter.sum() / area_label.sum()


def test_confusion_matrix_metrics_match_numpy():
  """Random predictions over three batches with ignore pixels and padding; class 6 never occurs (nan IoU)."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    predictions = rng.integers(0, CLASSES - 1, (2, 12, 9)).astype(np.int32)
    labels = _labels((2, 12, 9), rng)
    labels[labels == CLASSES - 1] = 0
    valid = np.ones((2, 12, 9), bool)
    valid[1, 8:] = False  # a padded image
    labels[1, 8:] = rng.integers(0, CLASSES, (4, 9))  # padding must not count whatever its label
    batches.append((predictions, labels.astype(np.uint8), valid))
  count = jax.jit(sm.confusion_matrix, static_argnums=2)
  total = sum(np.asarray(count(*map(jnp.asarray, (p, lab)), CLASSES, valid=jnp.asarray(v)), np.int64)
              for p, lab, v in batches)
  iou, miou, aacc = _numpy_scores(*(np.concatenate(parts) for parts in zip(*batches)))
  for scores in (sm.segmentation_scores(total), jax.jit(sm.segmentation_scores)(jnp.asarray(total))):
    np.testing.assert_allclose(np.asarray(scores["iou"]), iou, rtol=1e-6)
    assert np.isnan(scores["iou"][CLASSES - 1])
    np.testing.assert_allclose(float(scores["miou"]), miou, rtol=1e-6)
    np.testing.assert_allclose(float(scores["aacc"]), aacc, rtol=1e-6)


def test_logits_confusion_matrix_resizes_then_argmax():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 4, 5, CLASSES), np.float32)
  labels = _labels((2, 16, 20), rng)
  up = F.interpolate(torch.from_numpy(logits).permute(0, 3, 1, 2), size=(16, 20), mode="bilinear",
                     align_corners=False)
  predictions = up.argmax(1).numpy()
  expected = sm.confusion_matrix(jnp.asarray(predictions), jnp.asarray(labels), CLASSES)
  ours = sm.logits_confusion_matrix(jnp.asarray(logits), jnp.asarray(labels), CLASSES)
  np.testing.assert_array_equal(ours, expected)
  assert int(ours.sum()) == int((labels != 255).sum())
