"""The CPU-tuned layer: model kernels, XLA:CPU compile options and host memory settings, opted into on CPU hosts."""

from volo_jax.cpu.host_memory import tune_for_cpu_backend
from volo_jax.cpu.kernels import use_cpu_kernels
from volo_jax.cpu.xla import dot_library, jit

__all__ = ["dot_library", "jit", "tune_for_cpu_backend", "use_cpu_kernels"]
