"""One-line errors for the `--config` flag of train.py and evaluate: an unknown experiment, an unknown or misspelt
`--config.x.y` key or a value of the wrong type ends in one line naming it and the valid choices, exit 2
(ml_collections and absl would print a traceback and exit 1)."""

import difflib
import importlib.util
import re
import sys

from absl import flags

from volo_jax.errors import first_line


def parser(prog: str):
  """An absl `flags_parser` for `app.run` that turns a bad flag into `prog: error: …` on stderr and exit 2."""

  def parse(argv: list[str]) -> list[str]:
    try:
      remaining = flags.FLAGS(argv)
      if "config" in flags.FLAGS:  # a config file that fails to load raises at its first use: make that now
        flags.FLAGS["config"].value.keys()
      return remaining
    except Exception as e:  # absl's flags.Error, ml_collections' AttributeError/KeyError/TypeError, get_config's
      print(f"{prog}: error: {describe(argv, e)}", file=sys.stderr)
      sys.exit(2)

  return parse


def describe(argv: list[str], error: Exception) -> str:
  """The line for `error`, raised while absl parsed argv."""
  spec = _flag_value(argv, "config")
  if not spec:
    return _root_message(error)
  try:
    config = _load(spec)
  except Exception as load_error:  # pylint: disable=broad-except  # the file or its argument: what it said
    return f"--config {spec}: {first_line(load_error)}"
  for key in _override_keys(argv):
    problem = _unknown_key(config, key)
    if problem:
      return problem
  return _root_message(error)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith((f"--{name}=", f"-{name}=")):
      return arg.split("=", 1)[1]
  return None


def _override_keys(argv: list[str]) -> list[str]:
  return [m.group(1) for arg in argv if (m := re.match(r"--?config\.([^=\s]+)", arg))]


def _load(spec: str):
  """The config that `configs/X.py[:arg]` names (whatever loading it raises, it raises)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_config_under_check", path)
  if module_spec is None:
    raise FileNotFoundError(f"no config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _unknown_key(config, key: str) -> str | None:
  """A one-line message when `key` (dotted) is not a field of config, naming the fields that are."""
  node, path = config, []
  for part in key.split("."):
    fields = sorted(node.keys()) if hasattr(node, "keys") else []
    if part not in fields:
      where = ".".join(path) or "the config"
      close = difflib.get_close_matches(part, fields, n=1)
      hint = f" (did you mean {'.'.join(path + close)}?)" if close else ""
      return (f"unknown config key --config.{key}{hint}; {where} has: {', '.join(fields)}" if fields else
              f"--config.{key}: {where} is a value, not a group")
    node, path = node[part], path + [part]
  return None


def _root_message(error: BaseException) -> str:
  """absl's "flag --x=v: why" line where there is one in the chain of causes, else the innermost cause's first
  line (what get_config or the value parser said)."""
  chain = [error]
  while chain[-1].__cause__ is not None or (chain[-1].__context__ is not None
                                            and not chain[-1].__suppress_context__):
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  lines = [first_line(e) for e in chain]
  return next((line for line in lines if line.startswith("flag --")), lines[-1])
