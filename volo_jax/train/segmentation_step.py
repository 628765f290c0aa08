"""The segmentation run's loss and eval step, for step.make_train_step and the shared loop: mmseg's UperNet loss
(decode + aux_weight × auxiliary cross-entropy, 255 ignored) and a confusion matrix per evaluation batch from
mmseg's test time (sliding windows, optionally several scales and the mirrored image)."""

import jax.numpy as jnp

from volo_jax import segmentation_metrics as metrics_lib
from volo_jax.models import segmenter
from volo_jax.models.upernet import resize_bilinear
from volo_jax.train.step import eval_model


def loss_fn(config):
  """(model, batch, step_key) → (loss, {'accuracy'}: pixel accuracy over labelled pixels); batch =
  {'image': (B, crop, crop, 3) float32, 'label': (B, crop, crop) int32, 255 = ignore}."""
  aux_weight = config.segmentation.aux_weight

  def segmentation_loss(model, batch, step_key):
    del step_key  # the model's own streams (dropout, drop path) are all the randomness
    labels = batch["label"]
    logits, aux_logits = model.forward_train(batch["image"])
    logits = resize_bilinear(logits, labels.shape[1:3])  # (B, crop, crop, K): once, for the loss and the accuracy
    loss = metrics_lib.segmentation_loss(logits, aux_logits, labels, aux_weight=aux_weight)
    labelled = labels != metrics_lib.IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & labelled
    return loss, {"accuracy": correct.sum() / jnp.maximum(labelled.sum(), 1)}

  return segmentation_loss


def test_time_settings(config) -> dict:
  """predict_logits' keyword arguments from config.segmentation."""
  s = config.segmentation
  return {"crop": config.model.img_size, "stride": s.eval_stride, "mode": s.eval_mode, "flip": s.test_flip}


def make_eval_step(graphdef, rng_template, config, num_classes: int, use_ema: bool = False):
  """(state, batch) → {'confusion': (K, K) int32 over the batch's labelled pixels, 'count': images}; batch from
  pipeline.eval_dataset: 'images'/'sizes' per test scale, the base 'size', 'label' on its canvas and 'mask'
  (0 for padding examples)."""
  settings = test_time_settings(config)

  def eval_step(state, batch):
    model = eval_model(graphdef, rng_template, state, use_ema)
    labels = batch["label"]
    scores = segmenter.predict_logits(model, tuple(batch["images"]), tuple(batch["sizes"]), batch["size"],
                                      labels.shape[1:3], **settings)
    valid = jnp.broadcast_to(batch["mask"][:, None, None] > 0, labels.shape)
    confusion = metrics_lib.confusion_matrix(scores.argmax(-1), labels, num_classes, valid=valid)
    return {"confusion": confusion, "count": batch["mask"].sum()}

  return eval_step
