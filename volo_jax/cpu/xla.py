"""XLA:CPU compile options for jitted steps: which library runs the matrix products, and convolutions in XLA's
own (Eigen) kernels rather than YNNPACK's, which are slow on them.

`dots`: "auto" (oneDNN on AVX-512 CPUs, where its products are faster than YNNPACK's, else XLA's default
YNNPACK), "onednn", "ynnpack", or "default" (no compile options at all: XLA's own defaults). oneDNN gets each dot
alone (`INDIVIDUAL_DOT`): its fused form failed to compile a partition of the inference graph.
"""

import functools

import jax

ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
EIGEN_CONVOLUTIONS = {  # YNNPACK's default fusion types less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CHOICES = ("auto", "onednn", "ynnpack", "default")


@functools.cache
def _cpuinfo(key: str) -> str:
  """The first CPU's `key` field in /proc/cpuinfo (Linux); "" where there is none."""
  try:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == key), "")
  except OSError:
    return ""


def has_avx512() -> bool:
  """Whether the host's CPU flags include AVX-512 Foundation."""
  return "avx512f" in _cpuinfo("flags").split()


def cpu_model() -> str:
  """The host CPU's model name ("" where /proc/cpuinfo does not say)."""
  return _cpuinfo("model name")


def _check(dots: str) -> None:
  if dots not in CHOICES:
    raise ValueError(f"dots must be one of {CHOICES}, got {dots!r}")


def dot_library(dots: str = "auto") -> str:
  """The library XLA:CPU runs the products in under `dots` on this host: "onednn" or "ynnpack" (XLA's default,
  also under "default"). What `volo_jax.cpu.kernels.use_cpu_kernels` takes."""
  _check(dots)
  return "onednn" if dots == "onednn" or (dots == "auto" and has_avx512()) else "ynnpack"


def compiler_options(dots: str = "auto") -> dict:
  """`jax.jit(..., compiler_options=…)` for a step on the default backend: Eigen convolutions and the dot
  library `dots` picks; {} for "default" and off the CPU."""
  _check(dots)
  if dots == "default" or jax.default_backend() != "cpu":
    return {}
  return {**EIGEN_CONVOLUTIONS, **(ONEDNN_DOTS if dot_library(dots) == "onednn" else {})}


def jit(fun, *, dots: str = "auto", **jit_kwargs):
  """jax.jit(fun, **jit_kwargs) compiled with compiler_options(dots)."""
  return jax.jit(fun, compiler_options=compiler_options(dots), **jit_kwargs)
