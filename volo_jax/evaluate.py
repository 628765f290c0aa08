"""ImageNet (or any configured dataset) top-1/top-5 of a set of weights, exact over the whole eval split.

  python -m volo_jax.evaluate --config configs/imagenet.py:volo_d1_224 --weights CKPT_OR_PTH

CKPT_OR_PTH: an official/timm .pth(.tar), a .safetensors file, a `volo_jax.convert` directory or a training
workdir. Runs on all processes of a multi-host job like train.py.
"""

import json

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config (model, image size, dataset, crop_pct)")
flags.DEFINE_string("weights", None, "weights to evaluate")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-process runs)")
flags.mark_flags_as_required(["config", "weights"])


def evaluate_weights(config, weights: str) -> dict:
  """{'top1', 'top5', 'count'} of `weights` on config's eval split."""
  import jax  # pylint: disable=import-outside-toplevel
  from volo_jax.train import checkpoint, loop  # pylint: disable=import-outside-toplevel
  setup = loop.Setup(config, for_training=False)
  model = loop.build_model(config, setup.info.num_classes)
  checkpoint.load_pretrained(model, weights)
  with jax.set_mesh(setup.mesh):
    return setup.evaluate(setup.weights_state(model), setup.jit_eval_step(use_ema=False))


def main(argv):
  del argv
  from volo_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.tune_for_cpu_backend()  # before JAX starts its CPU client, as train.py
  if FLAGS.distributed:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  metrics = evaluate_weights(FLAGS.config, FLAGS.weights)
  print(json.dumps({"weights": FLAGS.weights, **metrics}))


if __name__ == "__main__":
  app.run(main)
