"""The expected failures of the command-line tools. Each message is one line for the user: bad input exits with 2,
a run that fails while training with 1. Anything else is a bug and keeps its traceback."""


class ConfigError(ValueError):
  """A config, flag, dataset or workdir that cannot work; raised before any compile or data read."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit the model."""


class DivergedError(FloatingPointError):
  """The loss or gradient became NaN/inf and config.nonfinite is 'stop'."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, workdir gone or read-only); the earlier ones are intact."""


class CheckpointCorruptError(RuntimeError):
  """The checkpoint to resume from cannot be read or fails its integrity check; the message names an intact one."""


class InputStalledError(RuntimeError):
  """The training input read many examples and delivered none: every one failed to decode or to find its label."""


def first_line(error: BaseException) -> str:
  """An exception's message as one line for the user: its first line (a KeyError's quotes dropped), or the type's
  name when it has no message."""
  text = str(error).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  return text.splitlines()[0].strip() if text else type(error).__name__


BAD_INPUT = (ConfigError, CheckpointError)  # exit code 2
RUN_FAILURE = (DivergedError, CheckpointWriteError, CheckpointCorruptError, InputStalledError)  # exit code 1
