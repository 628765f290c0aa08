"""Test set-up: 8 fake CPU devices, XLA's LLVM backend without optimisation (the suite's programs are small and
compiling them is most of its time; HLO passes, hence the numerics' structure, are unchanged), and torchvision
loaded before TensorFlow (the other order segfaults with some wheel combinations). glibc's malloc is left as it
is: the trainer's host-memory setting helps the small test programs on some CPUs and slows them on others, and it
would keep each worker's resident memory at its peak for the rest of the suite. Measurements: docs/performance.md,
'Test compile settings'."""

import os


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for this process and the tests' subprocesses: `devices` fake CPU devices, fast compiles."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_memory_between_modules():
  """Drop compiled executables and dead arrays after each test module: the suite holds several d1–d5 models."""
  yield
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()
