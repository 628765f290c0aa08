"""Keep freed host memory in the process when XLA runs on the CPU, and keep malloc off the step's critical path.

XLA:CPU mallocs a call's whole scratch space on every call; glibc serves blocks that large with mmap and unmaps
them on free, so every step would fault its scratch in again page by page. Served from the main heap, never
trimmed, each step reuses the pages of the one before. Only the main thread's arena grows that heap, so
single-device computations run on the calling thread (synchronous CPU dispatch); other threads keep their own
arenas, as glibc's default, since one shared arena makes malloc contended.
"""

import ctypes
import glob
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def accelerator_attached() -> bool:
  """Whether the host shows a GPU or TPU device file: then XLA's scratch lives on the device, not in malloc."""
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def retain_freed_memory() -> bool:
  """Large blocks from the heap instead of mmap, and no trimming of it.

  Linux with glibc only; returns whether every setting took. The process's resident memory then stays at its
  peak, which a training process reaches in its first step anyway.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 as the trim threshold is SIZE_MAX to glibc: never give the heap's top back.
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def tune_for_cpu_backend() -> bool:
  """On hosts without an accelerator, where XLA:CPU runs the steps: synchronous dispatch, so that a step's
  scratch comes from the main thread's arena, and retain_freed_memory(). Call it before JAX starts its CPU
  client (the first device query or computation)."""
  if accelerator_attached():
    return False
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # multi-device computations stay asynchronous
  return retain_freed_memory()
