"""Keep freed host memory in the process when XLA runs on the CPU.

XLA:CPU allocates a call's whole scratch space with malloc on every call (2.8 GB for the volo_d1 train step at
batch 8). glibc serves a block that large from a worker thread's arena with mmap and unmaps it on free, so
every step faults its scratch in again page by page: 0.73 M minor faults and 2.3 s of kernel time in a 5.8 s
step on 2 cores. Serving large blocks from the main heap and never trimming it lets each step reuse the pages
of the one before: under 1,000 faults in 35 of 36 steps (steps 2–10 of four processes; the step took 4.4 s
instead of 5.8). A step still faults now and then, when small blocks fragment the heap so that the scratch
no longer fits the hole the last one left; that step costs what it would by default.
"""

import ctypes
import glob
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def accelerator_attached() -> bool:
  """Whether the host shows a GPU or TPU device file: then XLA's scratch lives on the device, not in malloc."""
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def retain_freed_memory() -> bool:
  """One malloc arena for all threads, large blocks from the heap instead of mmap, and no trimming of it.

  Call it before JAX starts its CPU client (the first device query or computation): a thread that already
  has an arena keeps it. Linux with glibc only; returns whether every setting took. The process's resident
  memory then stays at its peak, which a training process reaches in its first step anyway.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # -1 as the trim threshold is SIZE_MAX to glibc: never give the heap's top back.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def tune_for_cpu_backend() -> bool:
  """retain_freed_memory() on hosts without an accelerator, where XLA:CPU will run the steps."""
  return not accelerator_attached() and retain_freed_memory()
