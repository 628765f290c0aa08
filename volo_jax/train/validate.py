"""Every check of a run's config that needs nothing but the config, the device count and small files it names, so
that a wrong model, size, batch, mesh, hyper-parameter, init_from path or token-label directory fails in a second
with one line (ConfigError), before the workdir is touched, anything is compiled or any data is read."""

import math
import os

import jax

from volo_jax.cpu import xla
from volo_jax.data import pipeline, token_label_store
from volo_jax.errors import ConfigError
from volo_jax.models.stack import REMAT_POLICIES
from volo_jax.models.volo import STRIDE, parse_model_name

NONFINITE_MODES = ("stop", "skip")
TASKS = ("classification", "segmentation")
SCHEDULES = ("cosine", "poly")
EVAL_MODES = ("slide", "whole")
DTYPES = ("float32", "bfloat16")


def check_config(config, *, for_training: bool = True) -> None:
  _choice("task", config.task, TASKS)
  check_model(config.model)
  check_batch(config)
  if config.task == "segmentation":
    check_segmentation(config)
  if not for_training:
    return
  check_hyperparameters(config)
  if config.finetune and not config.init_from:
    raise ConfigError(f"{config.experiment or 'this experiment'} fine-tunes a pretrained model: "
                      "set --config.init_from=<workdir, converted dir or .pth.tar>")
  if (config.init_from and "://" not in config.init_from and not config.init_from.startswith("hf-hub:")
      and not os.path.exists(config.init_from)):
    raise ConfigError(f"init_from {config.init_from}: no such file or directory")
  if not config.data.dataset:
    raise ConfigError("data.dataset is empty: set --config.data.dataset=<a TFDS name>, e.g. one written by "
                      "`python -m volo_jax.data.folder`")
  _choice("nonfinite", config.nonfinite, NONFINITE_MODES)
  _choice("cpu.dots", config.cpu.dots, xla.CHOICES)
  if config.eval_every_epochs < 0 or config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise ConfigError("eval_every_epochs must be ≥ 0 (0: no evaluation), log_every_steps and "
                      "checkpoint_every_steps > 0")
  if config.keep_checkpoints <= 0:
    raise ConfigError(f"keep_checkpoints {config.keep_checkpoints} must be > 0")
  if config.resume_step < 0:
    raise ConfigError(f"resume_step {config.resume_step} must be ≥ 0 (0: the latest checkpoint)")
  _choice("on_corrupt_checkpoint", config.on_corrupt_checkpoint, ("stop", "fallback"))
  check_token_labels(config)


def check_model(m) -> None:
  try:
    parse_model_name(m.name)
  except ValueError as e:
    raise ConfigError(f"model.name: {e}") from None
  if m.img_size <= 0 or m.img_size % STRIDE:
    raise ConfigError(f"model.img_size {m.img_size} is not a multiple of VOLO's stride {STRIDE} "
                      "(the stem's 8 × the downsample's 2)")
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.remat", m.remat, tuple(REMAT_POLICIES))
  for name in ("drop_path_rate", "drop_rate", "pos_drop_rate", "attn_drop_rate"):
    rate = m[name]
    if not 0 <= rate < 1:  # also refuses NaN
      raise ConfigError(f"model.{name} {rate} must be in [0, 1)")


def check_hyperparameters(config) -> None:
  """Learning rates, decay, betas and schedule lengths: finite and in range, so that no step runs on a NaN lr."""
  o, s = config.optimizer, config.schedule
  for name, value in (("optimizer.lr", o.lr), ("optimizer.weight_decay", o.weight_decay),
                      ("optimizer.clip_grad", o.clip_grad), ("schedule.warmup_lr", s.warmup_lr),
                      ("schedule.min_lr", s.min_lr), ("label_smoothing", config.label_smoothing),
                      ("ema_decay", config.ema_decay), ("optimizer.eps", o.eps)):
    if not math.isfinite(value) or value < 0:
      raise ConfigError(f"{name} {value} must be a finite number ≥ 0")
  for name, value in (("optimizer.b1", o.b1), ("optimizer.b2", o.b2), ("label_smoothing", config.label_smoothing),
                      ("ema_decay", config.ema_decay)):
    if not 0 <= value < 1:
      raise ConfigError(f"{name} {value} must be in [0, 1)")
  _choice("schedule.name", s.name, SCHEDULES)
  if s.name == "poly" and config.total_steps <= 0:
    raise ConfigError("schedule.name 'poly' counts in steps: set --config.total_steps (e.g. 160000)")
  if s.name == "poly" and (s.poly_warmup_steps < 0 or not 0 <= s.poly_warmup_ratio <= 1 or s.poly_power <= 0):
    raise ConfigError(f"schedule.poly_warmup_steps {s.poly_warmup_steps} must be ≥ 0, poly_warmup_ratio "
                      f"{s.poly_warmup_ratio} in [0, 1] and poly_power {s.poly_power} > 0")
  if config.eval_every_steps < 0:
    raise ConfigError(f"eval_every_steps {config.eval_every_steps} must be ≥ 0 (0: every eval_every_epochs)")
  if s.epochs <= 0 or s.warmup_epochs < 0 or s.cooldown_epochs < 0:
    raise ConfigError(f"schedule.epochs {s.epochs} must be > 0, warmup_epochs {s.warmup_epochs} and "
                      f"cooldown_epochs {s.cooldown_epochs} ≥ 0")
  if config.total_steps < 0:
    raise ConfigError(f"total_steps {config.total_steps} must be ≥ 0 (0: the schedule's length)")


def check_batch(config) -> None:
  """The global batch splits evenly over devices, processes and data shards; the mesh covers the devices."""
  devices, processes, batch = jax.device_count(), jax.process_count(), config.batch_size
  if batch <= 0:
    raise ConfigError(f"batch_size {batch} must be positive")
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else devices // max(fsdp, 1)
  if fsdp <= 0 or data * fsdp != devices:
    raise ConfigError(f"mesh data={config.mesh.data} × fsdp={fsdp} does not cover the {devices} devices")
  if batch % devices or batch % processes:
    raise ConfigError(f"batch_size {batch} is not divisible by the {devices} devices / {processes} processes")
  shards = pipeline.data_shards(config, processes)
  if shards % processes or (batch // processes) % (shards // processes):
    raise ConfigError(f"data.shards={shards} must be a multiple of the {processes} processes and divide the "
                      f"per-process batch {batch // processes} evenly")


def check_segmentation(config) -> None:
  """The segmentation group: a dataset with per-pixel labels, a train scale and test canvas the crop fits, a
  sliding stride within the crop; no classification-only training features."""
  from volo_jax.data import segmentation_datasets  # pylint: disable=import-outside-toplevel
  s, crop = config.segmentation, config.model.img_size
  segmentation_datasets.source(config.data.dataset)  # ConfigError for a dataset without a segmentation source
  if len(s.scale) != 2 or min(s.scale) <= 0:
    raise ConfigError(f"segmentation.scale {tuple(s.scale)} must be two positive sizes (long side, short side)")
  if len(s.ratio_range) != 2 or not 0 < s.ratio_range[0] <= s.ratio_range[1]:
    raise ConfigError(f"segmentation.ratio_range {tuple(s.ratio_range)} must be (low, high) with 0 < low ≤ high")
  if not 0 < s.cat_max_ratio <= 1:
    raise ConfigError(f"segmentation.cat_max_ratio {s.cat_max_ratio} must be in (0, 1]")
  if len(s.eval_canvas) != 2 or min(s.eval_canvas) < crop:
    raise ConfigError(f"segmentation.eval_canvas {tuple(s.eval_canvas)} must be at least the {crop} crop "
                      "(model.img_size) on both sides")
  _choice("segmentation.eval_mode", s.eval_mode, EVAL_MODES)
  if s.eval_mode == "whole" and tuple(s.eval_canvas) != (crop, crop):
    raise ConfigError(f"segmentation.eval_mode 'whole' runs the model on the whole canvas: eval_canvas "
                      f"{tuple(s.eval_canvas)} must equal the crop ({crop}, {crop}); use 'slide' for larger images")
  if not 0 < s.eval_stride <= crop:
    raise ConfigError(f"segmentation.eval_stride {s.eval_stride} must be in (0, {crop}] (the crop)")
  if not s.test_scales or min(s.test_scales) <= 0:
    raise ConfigError(f"segmentation.test_scales {tuple(s.test_scales)} must be positive ratios, e.g. (1.0,)")
  if s.aux_weight < 0 or s.channels <= 0 or s.aux_channels <= 0 or not 0 <= s.head_dropout < 1:
    raise ConfigError("segmentation.aux_weight must be ≥ 0, channels and aux_channels > 0, head_dropout in [0, 1)")
  if config.token_label.enabled or config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0:
    raise ConfigError("segmentation trains on per-pixel labels: token labeling, mixup and cutmix must be off")


def check_token_labels(config) -> None:
  """Token labeling on: a prepared label directory and a target size of one per model token."""
  tl = config.token_label
  if not tl.enabled:
    return
  if tl.size * STRIDE != config.model.img_size:
    raise ConfigError(f"token_label.size {tl.size} must be model.img_size/{STRIDE} = "
                      f"{config.model.img_size / STRIDE:g} (one target per token of the model's grid)")
  if not tl.dir:
    raise ConfigError("token labeling is on but token_label.dir is empty: prepare the label maps (README, Token "
                      "labeling) and pass --config.token_label.dir=DIR, or train without them: "
                      "--config.token_label.enabled=False")
  token_label_store.read_meta(tl.dir)


def _choice(name: str, value, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"{name} {value!r}: choose one of {', '.join(choices)}")
