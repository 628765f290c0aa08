"""The eval split's metrics for a set of weights, every image counted once: top-1/top-5 for classification,
mIoU, aAcc and per-class IoU for segmentation (optionally mmseg's multi-scale + flip test).

  python -m volo_jax.evaluate --config configs/imagenet.py:volo_d1_224 --weights CKPT_OR_PTH
  python -m volo_jax.evaluate --config configs/segmentation.py:ade20k_volo_d1 --weights WORKDIR [--multi-scale]

CKPT_OR_PTH: an official/timm .pth(.tar), a .safetensors file, a `volo_jax.convert` directory or a training
workdir. Runs on all processes of a multi-host job like train.py.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from volo_jax import distributed, flag_errors

PROG = "python -m volo_jax.evaluate"

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config (model, image size, dataset, crop_pct)")
flags.DEFINE_string("weights", None, "weights to evaluate")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-process runs: TPU pods and "
                  "SLURM are detected; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
flags.DEFINE_bool("multi-scale", False, "segmentation: test at the scale's ratios 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 "
                  "with flip, averaging the probabilities (mmseg's aug test)")
flags.mark_flags_as_required(["config", "weights"])


MULTI_SCALE = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's aug-test ratios


def evaluate_weights(config, weights: str, *, multi_scale: bool = False) -> dict:
  """{'top1', 'top5', 'count'} (classification) or {'miou', 'aacc', 'iou': per class, 'count'} (segmentation) of
  `weights` on config's eval split."""
  import jax  # pylint: disable=import-outside-toplevel
  from volo_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from volo_jax.train import checkpoint, loop  # pylint: disable=import-outside-toplevel
  if multi_scale:
    if config.task != "segmentation":
      raise ConfigError("--multi-scale is a segmentation test; this config classifies")
    config = config.copy_and_resolve_references()
    config.segmentation.test_scales, config.segmentation.test_flip = MULTI_SCALE, True
  run = loop.describe_run(config, for_training=False)
  model = loop.build_model(config, run.dataset.num_classes)
  checkpoint.load_pretrained(model, weights)
  with jax.set_mesh(run.mesh):
    return loop.evaluate(run, loop.weights_state(run, model), loop.jit_eval_step(run, use_ema=False))


def main(argv):
  del argv
  if FLAGS.config.cpu.tune_host:  # before JAX starts its CPU client, as train.py
    from volo_jax.cpu import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.tune_for_cpu_backend()
  if FLAGS.distributed:
    distributed.initialize()
  from volo_jax import errors  # pylint: disable=import-outside-toplevel
  try:
    metrics = evaluate_weights(FLAGS.config, FLAGS.weights, multi_scale=FLAGS["multi-scale"].value)
  except errors.BAD_INPUT as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"weights": FLAGS.weights, **metrics}))


if __name__ == "__main__":
  app.run(main, flags_parser=flag_errors.parser(PROG))
