"""jax.distributed.initialize for the command-line tools: jax detects TPU pods and SLURM itself; elsewhere
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the job (the same on every process)."""

import os


def wanted() -> bool:
  """Whether the environment describes a multi-process job (a TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS)."""
  return any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"))


def initialize() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(count) if count else None,
                             process_id=int(index) if index else None)
