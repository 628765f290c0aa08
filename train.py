"""Train or fine-tune VOLO: python train.py --config configs/X.py[:arg] --workdir DIR [--config.key=value ...]

Resumes from DIR's latest checkpoint when there is one. Multi-process (TPU pod, several GPU hosts) runs call
jax.distributed.initialize() first; the command is the same on every worker.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from volo_jax import distributed, flag_errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (configs/…py[:argument])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and the resolved config go here")
flags.DEFINE_bool("distributed", None, "call jax.distributed.initialize() (default: when the environment is "
                  "a TPU pod, SLURM or sets JAX_COORDINATOR_ADDRESS)")
flags.mark_flags_as_required(["config", "workdir"])




class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log (its warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  config = FLAGS.config
  if config.cpu.tune_host:  # before JAX starts its CPU client; a no-op where an accelerator is attached
    from volo_jax.cpu import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.tune_for_cpu_backend()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax  # pylint: disable=import-outside-toplevel
  if distributed.wanted() if FLAGS.distributed is None else FLAGS.distributed:
    distributed.initialize()
  from volo_jax import errors  # pylint: disable=import-outside-toplevel
  from volo_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  try:
    train_and_evaluate(config, FLAGS.workdir)
  except errors.BAD_INPUT as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(2)  # as absl does for a bad flag
  except errors.RUN_FAILURE as e:
    logging.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=flag_errors.parser("train.py"))
