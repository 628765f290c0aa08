"""host_memory: with freed memory retained, a repeated XLA:CPU call reuses its scratch pages instead of
faulting them in again (measured as minor page faults in a fresh process)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from volo_jax import host_memory

# A call whose XLA scratch (≈ 0.3 GB of activations kept for the backward pass) is far above glibc's mmap
# threshold; prints the scratch size and the minor faults of its third call.
_PROBE = """
import json, resource, sys
from volo_jax import host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else False
import jax, jax.numpy as jnp
def loss(ws, x):
  for w in ws:
    x = jnp.tanh(x @ w)
  return (x ** 2).sum()
ws = [jnp.full((512, 512), 1e-3, jnp.float32) for _ in range(16)]
x = jnp.ones((8192, 512), jnp.float32)
grad = jax.jit(jax.grad(loss)).lower(ws, x).compile()
for _ in range(2):
  jax.block_until_ready(grad(ws, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready(grad(ws, x))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults,
                  "scratch_pages": grad.memory_analysis().temp_size_in_bytes // 4096}))
"""


def _probe(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_the_scratch_page_faults():
  default, retained = _probe("default"), _probe("retain")
  assert retained["retained"]
  assert default["scratch_pages"] > 50_000  # > 200 MB: glibc would map it anew on every call
  assert default["faults"] > 0.5 * default["scratch_pages"]  # the default faults the scratch in each call
  assert retained["faults"] < 0.05 * retained["scratch_pages"]


def test_no_tuning_where_an_accelerator_is_attached(monkeypatch):
  monkeypatch.setattr(host_memory, "accelerator_attached", lambda: True)
  monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: pytest.fail("tuned an accelerator host"))
  assert host_memory.tune_for_cpu_backend() is False
