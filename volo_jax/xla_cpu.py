"""XLA:CPU compile options for the jitted steps: which library runs the matrix products and the convolutions.

XLA:CPU hands dots to YNNPACK by default. On a 2-core Xeon with AVX-512 its products ran at 0.5–0.6× oneDNN's
(fc1, 1568×384×1152: 187 vs 343 GFLOP/s), and the volo_d1 train step took 0.94× the time with every plain dot
in oneDNN (7 of 8 alternated steps faster), inference 0.89× (9 of 10). On a 2-core AMD EPYC with AVX2,
YNNPACK's products were as fast as any (60–80 GFLOP/s per core), so elsewhere the default stays. On a Zen 4
EPYC (AVX-512) the two measured within noise in the step (YNNPACK's 1.039× and 0.977× oneDNN's time).
`INDIVIDUAL_DOT` gives oneDNN each dot alone: its fused form (`DOT`, elementwise neighbours included) failed to
compile a partition of the inference graph and crashed the process.

Convolutions run in XLA's own (Eigen) kernels rather than YNNPACK's. On the Xeon, YNNPACK's were 3× slower:
the stem's 3×3 64→64 convolution at 112², batch 8, forward 87 vs 27 ms, forward + both gradients 419 vs 115 ms.
That makes native convolutions faster than the patch-matmul forms the stem used before (stem fwd+bwd 361 vs 400
ms; d1 train step 0.985× the time, 12 of 14 alternated steps faster; inference 0.915×, 15 of 15). YNNPACK keeps
the dots and reductions it takes by default (the d1 step's HLO without convolutions is identical).
"""

import functools

import jax

ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
EIGEN_CONVOLUTIONS = {  # YNNPACK's default fusion types less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CHOICES = ("auto", "onednn", "ynnpack")


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


def compiler_options(dots: str = "auto") -> dict:
  """`jax.jit(..., compiler_options=…)` for a step on the default backend: Eigen convolutions and the dot
  library. dots: "auto" picks oneDNN on an AVX-512 CPU and XLA's default (YNNPACK) otherwise; "onednn" and
  "ynnpack" force one. {} off the CPU."""
  if dots not in CHOICES:
    raise ValueError(f"dots must be one of {CHOICES}, got {dots!r}")
  if jax.default_backend() != "cpu":
    return {}
  use_onednn = dots == "onednn" or (dots == "auto" and has_avx512())
  return {**EIGEN_CONVOLUTIONS, **(ONEDNN_DOTS if use_onednn else {})}
