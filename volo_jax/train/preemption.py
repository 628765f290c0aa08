"""SIGTERM (a preempted VM, `kill`, a scheduler's stop) → save the current step and exit 0.

One process: our own SIGTERM handler sets a flag that the loop reads after each step, and also while it waits
for input or for the first step's compile (`signalled`), so that a stalled run still stops at once. Several
processes: jax's preemption sync manager (started by jax.distributed.initialize) catches SIGTERM itself and
orbax's `reached_preemption` makes every process stop at the same step, so the checkpoint they write together is
whole; installing a Python handler there would take SIGTERM away from it.
"""

import signal
import threading

import jax
from absl import logging


class PreemptionWatch:
  """`reached(step)`: True once a stop was asked for; every process gets the same answer for the same step."""

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True
    logging.warning("SIGTERM: saving a checkpoint at the end of this step (at once if waiting for input or a "
                    "compile), then exiting")

  def signalled(self) -> bool:
    """This process's own SIGTERM flag (one process only: several stop together at the step they agree on)."""
    return self._signalled

  def reached(self, step: int) -> bool:
    return self._signalled or self._checkpointer.reached_preemption(step)

  def close(self) -> None:
    """Gives SIGTERM back to whoever had it before (pytest, an embedding program)."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
