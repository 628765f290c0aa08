"""Semantic segmentation's loss and metrics as jit-able JAX functions on channels-last logits.

The loss is mmseg's: logits bilinearly resized to the label size (PyTorch's semantics), cross-entropy with ignore
index 255 averaged over the labelled pixels, main + 0.4 × auxiliary. The metrics are mmseg's: a confusion matrix
summed over the whole evaluation set (on a global batch under jit it is already the sum over processes), then
per-class IoU, mIoU (nan-mean over the classes that occur in prediction or label) and aAcc.
"""

import jax
import jax.numpy as jnp
import numpy as np

from volo_jax.models.upernet import resize_bilinear

IGNORE_INDEX = 255
AUX_WEIGHT = 0.4


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """logits (B, h, w, K) at any resolution, labels (B, H, W) int → mean CE over pixels whose label is not
  `ignore_index` (0 when there are none, where PyTorch gives nan), float32."""
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])  # (B, H, W, K)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  count = valid.sum()
  return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1)


def segmentation_loss(logits: jax.Array, aux_logits: jax.Array | None, labels: jax.Array, *,
                      aux_weight: float = AUX_WEIGHT, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """The UperNet training loss: CE(decode logits) + aux_weight · CE(aux logits), each resized to the labels."""
  loss = cross_entropy(logits, labels, ignore_index=ignore_index)
  if aux_logits is not None:
    loss = loss + aux_weight * cross_entropy(aux_logits, labels, ignore_index=ignore_index)
  return loss


def confusion_matrix(predictions: jax.Array, labels: jax.Array, num_classes: int, *, valid: jax.Array | None = None,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """predictions, labels (B, H, W) int; valid (B, H, W) bool or None (padding pixels False) → (K, K) int32
  counts, rows = label, columns = prediction. Pixels labelled `ignore_index` (or outside [0, K)) are skipped.

  int32 holds a batch; sum the per-batch matrices in int64 on the host (a whole evaluation set can exceed 2³¹).
  """
  labels, predictions = labels.astype(jnp.int32), predictions.astype(jnp.int32)  # uint8 labels overflow ×K
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep &= valid
  index = jnp.where(keep, labels * num_classes + predictions, 0).reshape(-1)
  counts = jnp.bincount(index, weights=keep.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def logits_confusion_matrix(logits: jax.Array, labels: jax.Array, num_classes: int, *,
                            valid: jax.Array | None = None, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """logits (B, h, w, K) resized to the labels' (B, H, W) size, argmax, then `confusion_matrix`."""
  predictions = jnp.argmax(resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3]), axis=-1)
  return confusion_matrix(predictions, labels, num_classes, valid=valid, ignore_index=ignore_index)


def segmentation_scores(confusion) -> dict:
  """(K, K) confusion matrix (rows label, columns prediction) → {'iou': (K,) with nan for classes in neither
  prediction nor label, 'miou': their nan-mean, 'aacc': correct / labelled pixels}. JAX or numpy input."""
  xp = jnp if isinstance(confusion, jax.Array) else np
  confusion = confusion.astype(xp.float64 if xp is np else jnp.float32)
  intersection = xp.diagonal(confusion)
  union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
  iou = xp.where(union > 0, intersection / xp.where(union > 0, union, 1), xp.nan)
  return {"iou": iou, "miou": xp.nanmean(iou), "aacc": intersection.sum() / confusion.sum()}
