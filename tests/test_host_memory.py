"""volo_jax.cpu.host_memory: tuned for the CPU backend, a repeated XLA:CPU call reuses its scratch pages instead
of faulting them in again (measured as minor page faults in a fresh process). Both settings are needed: with
asynchronous dispatch the scratch comes from a worker thread's arena, which maps it anew on every call. XLA's worker
threads keep malloc arenas of their own (counted with glibc's malloc_info): one shared arena contends in malloc."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from volo_jax.cpu import host_memory

# A train-step-like call (weights donated and updated) whose XLA scratch (≈ 0.3 GB of activations kept for the
# backward pass) is far above glibc's mmap threshold; prints the scratch size and the minor page faults of
# calls 2–8. With memory retained the pages are reused in most calls, not all: the small blocks XLA allocates
# around the scratch can fragment the heap so that a call's scratch no longer fits the hole the last one left.
# Also prints the number of malloc arenas (glibc's malloc_info writes one <heap> element per arena).
_PROBE = """
import ctypes, json, re, resource, sys, tempfile
from volo_jax.cpu import host_memory
retained = host_memory.tune_for_cpu_backend() if sys.argv[1] == "retain" else False
import jax, jax.numpy as jnp
def loss(ws, x):
  for w in ws:
    x = jnp.tanh(x @ w)
  return (x ** 2).sum()
def sgd(ws, x):
  return [w - 1e-6 * g for w, g in zip(ws, jax.grad(loss)(ws, x))]
ws = [jnp.full((512, 512), 1e-3, jnp.float32) for _ in range(16)]
x = jnp.ones((8192, 512), jnp.float32)
step = jax.jit(sgd, donate_argnums=0).lower(ws, x).compile()
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ws = jax.block_until_ready(step(ws, x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
with tempfile.NamedTemporaryFile("r") as info:
  stream = libc.fopen(info.name.encode(), b"w")
  libc.malloc_info(0, stream)
  libc.fclose(stream)
  arenas = len(re.findall("<heap nr=", info.read()))
print(json.dumps({"retained": retained, "faults": faults[1:], "arenas": arenas,
                  "scratch_pages": step.memory_analysis().temp_size_in_bytes // 4096}))
"""


def _probes(*modes: str) -> list[dict]:
  """Runs the probe once per mode, the processes side by side (page faults do not depend on timing)."""
  procs = [subprocess.Popen([sys.executable, "-c", _PROBE, mode], stdout=subprocess.PIPE, text=True,
                            cwd=pathlib.Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
           for mode in modes]
  outs = [proc.communicate()[0] for proc in procs]
  assert all(proc.returncode == 0 for proc in procs)
  return [json.loads(out.strip().splitlines()[-1]) for out in outs]


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory.accelerator_attached(),
                    reason="glibc's mallopt, on a host where XLA:CPU runs the steps")
def test_retained_memory_lets_calls_reuse_their_scratch_pages():
  default, retained = _probes("default", "retain")
  assert retained["retained"]
  assert default["scratch_pages"] > 50_000  # > 200 MB: glibc maps it anew on every call
  assert min(default["faults"]) > 0.5 * default["scratch_pages"]  # every call faults its scratch in again
  assert min(retained["faults"]) < 0.05 * retained["scratch_pages"]  # a call that reuses the freed pages
  assert retained["arenas"] > 1  # XLA's worker threads allocate from arenas of their own


def test_no_tuning_where_an_accelerator_is_attached(monkeypatch):
  monkeypatch.setattr(host_memory, "accelerator_attached", lambda: True)
  monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: pytest.fail("tuned an accelerator host"))
  assert host_memory.tune_for_cpu_backend() is False
