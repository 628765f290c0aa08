"""XLA:CPU compile options for the jitted steps: which library runs the matrix products and the convolutions.
`jit` compiles a step with them and lets the layers it traces ask which dot library that step uses.

XLA:CPU hands dots to YNNPACK by default. On a 2-core Xeon with AVX-512 its products ran at 0.5–0.6× oneDNN's
(fc1, 1568×384×1152: 187 vs 343 GFLOP/s), and the volo_d1 train step took 0.94× the time with every plain dot
in oneDNN (7 of 8 alternated steps faster), inference 0.89× (9 of 10). On a 2-core AMD EPYC with AVX2,
YNNPACK's products were as fast as any (60–80 GFLOP/s per core), so elsewhere the default stays. On a Zen 4
EPYC (AVX-512) YNNPACK's step took 1.039×, 0.977× and 1.069× oneDNN's time in three alternated runs.
`INDIVIDUAL_DOT` gives oneDNN each dot alone: its fused form (`DOT`, elementwise neighbours included) failed to
compile a partition of the inference graph and crashed the process.

Convolutions run in XLA's own (Eigen) kernels rather than YNNPACK's. On the Xeon, YNNPACK's were 3× slower:
the stem's 3×3 64→64 convolution at 112², batch 8, forward 87 vs 27 ms, forward + both gradients 419 vs 115 ms.
That makes native convolutions faster than the patch-matmul forms the stem used before (stem fwd+bwd 361 vs 400
ms; d1 train step 0.985× the time, 12 of 14 alternated steps faster; inference 0.915×, 15 of 15). YNNPACK keeps
the dots and reductions it takes by default (the d1 step's HLO without convolutions is identical).
"""

import contextvars
import functools

import jax

ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
EIGEN_CONVOLUTIONS = {  # YNNPACK's default fusion types less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CHOICES = ("auto", "onednn", "ynnpack")
_TRACING_DOTS = contextvars.ContextVar("xla_cpu_tracing_dots", default="auto")  # set by `jit` while it traces


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


def onednn_dots(dots: str | None = None) -> bool:
  """Whether XLA:CPU's products run in oneDNN under `dots`; by default under the choice of the `jit` tracing
  the caller ("auto" outside one). dots: "auto" picks oneDNN on an AVX-512 CPU, "onednn" and "ynnpack" force
  one. False off the CPU."""
  dots = _TRACING_DOTS.get() if dots is None else dots
  if dots not in CHOICES:
    raise ValueError(f"dots must be one of {CHOICES}, got {dots!r}")
  return jax.default_backend() == "cpu" and (dots == "onednn" or (dots == "auto" and has_avx512()))


def compiler_options(dots: str = "auto") -> dict:
  """`jax.jit(..., compiler_options=…)` for a step on the default backend: Eigen convolutions and the dot
  library `dots` picks (see onednn_dots). {} off the CPU."""
  use_onednn = onednn_dots(dots)  # validates dots
  if jax.default_backend() != "cpu":
    return {}
  return {**EIGEN_CONVOLUTIONS, **(ONEDNN_DOTS if use_onednn else {})}


def jit(fun, *, dots: str = "auto", **jit_kwargs):
  """jax.jit(fun, **jit_kwargs) with compiler_options(dots), tracing fun under `dots`: layers whose best form
  depends on the dot library (plain_backward's attention) ask onednn_dots() and get this step's answer."""
  @functools.wraps(fun)
  def traced_under_dots(*args, **kwargs):
    token = _TRACING_DOTS.set(dots)
    try:
      return fun(*args, **kwargs)
    finally:
      _TRACING_DOTS.reset(token)
  return jax.jit(traced_under_dots, compiler_options=compiler_options(dots), **jit_kwargs)
