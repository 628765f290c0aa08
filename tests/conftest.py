"""Test-session set-up: 8 fake CPU devices, freed host memory kept in the process (as train.py does on a CPU
host: XLA:CPU's per-call scratch is not faulted in again on every call), and torchvision loaded before
TensorFlow (the other order segfaults with this machine's wheels)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from volo_jax import host_memory  # noqa: E402

host_memory.tune_for_cpu_backend()  # before any test starts JAX's CPU client

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
