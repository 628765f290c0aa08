"""The two kinds of run the one trainer knows: what differs between classification (VOLO, the ImageNet recipes)
and semantic segmentation (VOLO + UperNet, mmseg's recipe). Everything else (data sharding, checkpoints, resume,
SIGTERM, the non-finite guard, logs) is the loop's, shared."""

import numpy as np

from volo_jax import segmentation_metrics
from volo_jax.models import create_model
from volo_jax.models.segmenter import create_segmenter
from volo_jax.train import segmentation_step, step as step_lib

TASKS = ("classification", "segmentation")


class Classification:
  """VOLO on whole-image labels: top-1/top-5 over the eval split."""

  @staticmethod
  def create_model(config, num_classes: int, dtype):
    m, tl = config.model, config.token_label
    return create_model(m.name, img_size=m.img_size, num_classes=num_classes, seed=config.seed,
                        drop_path_rate=m.drop_path_rate, drop_rate=m.drop_rate, pos_drop_rate=m.pos_drop_rate,
                        attn_drop_rate=m.attn_drop_rate, mix_token=tl.enabled and tl.mix_token,
                        scan_blocks=m.scan_blocks, remat=m.remat, dtype=dtype)

  @staticmethod
  def loss_fn(config, num_classes: int):
    return step_lib.classification_loss(config, num_classes)

  @staticmethod
  def make_eval_step(graphdef, rng_template, config, num_classes: int, use_ema: bool):
    del config, num_classes
    return step_lib.make_eval_step(graphdef, rng_template, use_ema)

  @staticmethod
  def eval_metrics(totals: dict, class_names=None) -> dict:
    del class_names
    count = max(totals["count"], 1)
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count, "count": int(totals["count"])}

  @staticmethod
  def eval_summary(metrics: dict) -> tuple[str, dict]:
    """(log text, TensorBoard scalars) of eval_metrics' result."""
    return (f"top-1 {metrics['top1']:.4f} top-5 {metrics['top5']:.4f}",
            {"eval/top1": metrics["top1"], "eval/top5": metrics["top5"]})


class Segmentation:
  """VOLO + UperNet on per-pixel labels: mIoU, aAcc and per-class IoU from the eval split's confusion matrix."""

  @staticmethod
  def create_model(config, num_classes: int, dtype):
    m, s = config.model, config.segmentation
    return create_segmenter(m.name, num_classes, img_size=m.img_size, seed=config.seed, channels=s.channels,
                            aux_channels=s.aux_channels, dropout_rate=s.head_dropout,
                            drop_path_rate=m.drop_path_rate, scan_blocks=m.scan_blocks, remat=m.remat, dtype=dtype)

  @staticmethod
  def loss_fn(config, num_classes: int):
    del num_classes
    return segmentation_step.loss_fn(config)

  @staticmethod
  def make_eval_step(graphdef, rng_template, config, num_classes: int, use_ema: bool):
    return segmentation_step.make_eval_step(graphdef, rng_template, config, num_classes, use_ema)

  @staticmethod
  def eval_metrics(totals: dict, class_names=None) -> dict:
    scores = segmentation_metrics.segmentation_scores(np.asarray(totals["confusion"], np.int64))
    names = class_names or [str(k) for k in range(len(scores["iou"]))]
    return {"miou": float(scores["miou"]), "aacc": float(scores["aacc"]), "count": int(totals["count"]),
            "iou": {name: float(v) for name, v in zip(names, scores["iou"])}}

  @staticmethod
  def eval_summary(metrics: dict) -> tuple[str, dict]:
    return (f"mIoU {metrics['miou']:.4f} aAcc {metrics['aacc']:.4f}",
            {"eval/miou": metrics["miou"], "eval/aacc": metrics["aacc"]})


def for_config(config):
  """The config's kind of run (validate.check_config has checked config.task)."""
  return Segmentation if config.task == "segmentation" else Classification


def add_counts(totals: dict, counts: dict) -> dict:
  """Host sums of eval-step counts: integers in int64 (a confusion matrix over a whole set passes 2³¹)."""
  out = dict(totals)
  for key, value in counts.items():
    value = np.asarray(value)
    value = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float64)
    out[key] = out[key] + value if key in out else value
  return out
