"""Checks of a training config that need nothing but the config and the device count, so that a wrong model
name, image size, batch size, mesh or init_from path fails in a second with one line, before the workdir is
touched, anything is compiled or any data is read."""

import os

import jax

from volo_jax import xla_cpu
from volo_jax.data import pipeline
from volo_jax.models.volo import STRIDE, parse_model_name
from volo_jax.train.errors import ConfigError

NONFINITE_MODES = ("stop", "skip")
DTYPES = ("float32", "bfloat16")


def check_config(config, *, for_training: bool = True) -> None:
  m = config.model
  try:
    parse_model_name(m.name)
  except ValueError as e:
    raise ConfigError(f"model.name: {e}") from None
  if m.img_size <= 0 or m.img_size % STRIDE:
    raise ConfigError(f"model.img_size {m.img_size} is not a multiple of VOLO's stride {STRIDE} "
                      "(the stem's 8 × the downsample's 2)")
  if m.get("dtype", "float32") not in DTYPES:
    raise ConfigError(f"model.dtype {m.dtype!r}: choose one of {', '.join(DTYPES)}")
  check_batch(config)
  if not for_training:
    return
  if config.get("finetune") and not config.get("init_from"):
    raise ConfigError(f"{config.get('experiment', 'this experiment')} fine-tunes a pretrained model: "
                      "set --config.init_from=<workdir, converted dir or .pth.tar>")
  init_from = config.get("init_from")
  if init_from and "://" not in init_from and not os.path.exists(init_from):
    raise ConfigError(f"init_from {init_from}: no such file or directory")
  if config.get("nonfinite", "stop") not in NONFINITE_MODES:
    raise ConfigError(f"nonfinite {config.nonfinite!r}: choose one of {', '.join(NONFINITE_MODES)}")
  if config.get("xla_cpu_dots", "auto") not in xla_cpu.CHOICES:
    raise ConfigError(f"xla_cpu_dots {config.xla_cpu_dots!r}: choose one of {', '.join(xla_cpu.CHOICES)}")
  if config.eval_every_epochs < 0 or config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    raise ConfigError("eval_every_epochs must be ≥ 0 (0: no evaluation), log_every_steps and "
                      "checkpoint_every_steps > 0")


def check_batch(config) -> None:
  """The global batch splits evenly over devices, processes and data shards; the mesh covers the devices."""
  devices, processes, batch = jax.device_count(), jax.process_count(), config.batch_size
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else devices // max(fsdp, 1)
  if fsdp <= 0 or data * fsdp != devices:
    raise ConfigError(f"mesh data={config.mesh.data} × fsdp={fsdp} does not cover the {devices} devices")
  if batch <= 0 or batch % devices or batch % processes:
    raise ConfigError(f"batch_size {batch} is not divisible by the {devices} devices / {processes} processes")
  shards = pipeline.data_shards(config, processes)
  if shards % processes or (batch // processes) % (shards // processes):
    raise ConfigError(f"data.shards={shards} must be a multiple of the {processes} processes and divide the "
                      f"per-process batch {batch // processes} evenly")
