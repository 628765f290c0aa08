"""The trainer's expected failures. Each message is one line for the user; train.py prints it and exits non-zero
(bad input with 2, a run that fails while training with 1). Anything else is a bug and keeps its traceback."""

from volo_jax.convert.torch_io import CheckpointError


class ConfigError(ValueError):
  """A config, flag, dataset or workdir that cannot work; raised before any compile or data read."""


class DivergedError(FloatingPointError):
  """The loss or gradient became NaN/inf and config.nonfinite is 'stop'."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, workdir gone or read-only); the earlier ones are intact."""


BAD_INPUT = (ConfigError, CheckpointError)  # exit code 2
RUN_FAILURE = (DivergedError, CheckpointWriteError)  # exit code 1
