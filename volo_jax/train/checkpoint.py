"""Checkpoints of the train state (orbax CheckpointManager: async, every N steps, keep K, save on preemption) and
loading of pretrained weights for `init_from` / evaluation from any of the formats we read."""

import contextlib
import glob
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from volo_jax.convert import flax_io, mapping, segmenter as segmenter_convert
from volo_jax.models import create_model
from volo_jax.models.segmenter import VoloUperNet, create_segmenter
from volo_jax.errors import CheckpointCorruptError, CheckpointError, CheckpointWriteError, ConfigError, first_line

CHECKPOINT_DIR = "checkpoints"
CONFIG_JSON = "config.json"
INTEGRITY_JSON = "integrity.json"  # in each step's directory: size and SHA-256 of every file of the saved state
SET_ASIDE_DIR = "checkpoints_set_aside"  # damaged or superseded steps are moved here, never deleted
NO_RECORD = "no integrity record"


# ------------------------------------------------------------------------------------------- integrity


def _state_files(step_dir: str) -> list[str]:
  """The files that hold the saved state: everything in the step's item directories. orbax rewrites its
  top-level bookkeeping files (_CHECKPOINT_METADATA, commit_success.txt) after the save, and restoring does not
  depend on them."""
  files = []
  for name in sorted(os.listdir(step_dir)):
    item = os.path.join(step_dir, name)
    if os.path.isdir(item):
      for root, _, names in os.walk(item):
        files.extend(os.path.relpath(os.path.join(root, n), step_dir) for n in names)
  return sorted(files)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def write_integrity_record(step_dir: str) -> None:
  """Records every state file's size and SHA-256, read back once the save's files are complete (still in the
  page cache), so that a truncated or altered file is found before it is restored."""
  files = {f: {"size": os.path.getsize(os.path.join(step_dir, f)), "sha256": _sha256(os.path.join(step_dir, f))}
           for f in _state_files(step_dir)}
  record = {"algorithm": "sha256", "files": files}
  with open(os.path.join(step_dir, INTEGRITY_JSON + ".tmp"), "w") as f:
    json.dump(record, f, indent=1)
  os.replace(os.path.join(step_dir, INTEGRITY_JSON + ".tmp"), os.path.join(step_dir, INTEGRITY_JSON))


def verify_integrity(step_dir: str) -> str | None:
  """None when every recorded file is there with its size and digest, "no integrity record" for a checkpoint
  written before records existed, else what is wrong with the first bad file."""
  path = os.path.join(step_dir, INTEGRITY_JSON)
  if not os.path.exists(path):
    return NO_RECORD
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    return f"its integrity record {path} is unreadable ({type(e).__name__}: {e})"
  for name, expected in files.items():
    full = os.path.join(step_dir, name)
    if not os.path.isfile(full):
      return f"{name} is missing"
    size = os.path.getsize(full)
    if size != expected["size"]:
      return f"{name} is {size} bytes, {expected['size']} were written (truncated or overwritten)"
    if _sha256(full) != expected["sha256"]:
      return f"{name} does not match the SHA-256 recorded when it was written (altered on disk)"
  return None


def check_step(directory: str, step: int, what: str = "restored") -> str | None:
  """What is wrong with a step's files; None when they verify, or (noted in the log) when the checkpoint was written
  before integrity records existed."""
  problem = verify_integrity(os.path.join(directory, str(step)))
  if problem == NO_RECORD:
    logging.info("the checkpoint of step %d has no integrity record (written by an earlier version): %s unverified",
                 step, what)
    return None
  return problem


def newest_intact(directory: str, steps, below: int) -> int | None:
  """The newest of `steps` before `below` whose files verify (or that has no record to verify against)."""
  return next((s for s in sorted(steps, reverse=True)
               if s < below and verify_integrity(os.path.join(directory, str(s))) in (None, NO_RECORD)), None)


def finished_steps(workdir: str) -> set[int]:
  """The steps of the workdir's finished checkpoints (orbax names those by their step; partial ones carry a
  temporary suffix until complete)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  return {int(name) for name in os.listdir(directory) if name.isdigit()} if os.path.isdir(directory) else set()


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a finished checkpoint."""
  return bool(finished_steps(workdir))


def check_workdir(workdir: str) -> None:
  """Creates the workdir if needed and proves that a file can be written in it, before any work is done."""
  try:
    os.makedirs(os.path.join(workdir, CHECKPOINT_DIR), exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


class Checkpointer:
  """The workdir's checkpoints. Every process calls every method (orbax coordinates the shards).

  A step's checkpoint is written to a temporary directory and renamed when complete, so a crash or a full disk
  mid-save leaves the earlier checkpoints as they were and `latest_step` never names a partial one. Write
  failures (also those of an earlier asynchronous save, which surface at the next save or wait) become a
  CheckpointWriteError that names the step. Each step carries an integrity record that `restore` checks first:
  a damaged checkpoint is never restored (CheckpointCorruptError names the newest intact one).
  """

  def __init__(self, workdir: str, config):
    # The integrity record is written into the step's temporary directory before orbax renames it, so a
    # finished checkpoint always carries its record.
    options = ocp.CheckpointManagerOptions(save_interval_steps=config.checkpoint_every_steps,
                                           max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True,
                                           async_options=ocp.AsyncOptions(post_finalization_callback=self._record))
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight = None  # the step of the last save started
    self._saving = None  # the step whose files the finalization callback records

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _record(self) -> None:
    """orbax's post-finalization callback (its save thread): the step's files are complete, not yet renamed."""
    if jax.process_index() != 0 or self._saving is None:
      return
    candidates = glob.glob(os.path.join(self.directory, f"{self._saving}.orbax-checkpoint-tmp*"))
    write_integrity_record(candidates[0] if candidates else os.path.join(self.directory, str(self._saving)))

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs carrying the target shardings (the mesh may differ from the writer's).
    The step's files are verified against its integrity record first; CheckpointCorruptError when they differ
    or do not read."""
    try:
      return self._restore_verified(step, abstract_state)
    except _Damaged as e:
      raise CheckpointCorruptError(self._damaged(step, str(e))) from None

  def _restore_verified(self, step: int, abstract_state):
    problem = check_step(self.directory, step)
    if problem:
      raise _Damaged(problem)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise _Damaged(f"cannot be read: {first_line(e)}") from None

  def _damaged(self, step: int, problem: str) -> str:
    intact = newest_intact(self.directory, self.manager.all_steps(), below=step)
    hint = (f"the newest intact checkpoint is step {intact}: resume from it with --config.resume_step={intact} "
            "(or --config.on_corrupt_checkpoint=fallback)" if intact is not None else "no intact checkpoint is left")
    return f"the checkpoint of step {step} in {self.directory} is damaged: {problem}; {hint}"

  def resume(self, abstract_state, *, resume_step: int = 0, on_corrupt: str = "stop"):
    """The state to resume from, or None when the workdir holds no checkpoint. resume_step > 0 picks that step
    (the later ones are set aside); else the latest, or with on_corrupt='fallback' the newest intact one when
    the latest fails to verify or read (the damaged ones are set aside, never deleted)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if resume_step:
      if resume_step not in steps:
        raise ConfigError(f"resume_step {resume_step}: {self.directory} holds the checkpoints of steps "
                          f"{sorted(steps) or 'none'}")
      state = self.restore(resume_step, abstract_state)
      self._set_aside([s for s in steps if s > resume_step], f"superseded: resumed from step {resume_step}")
      return state
    for step in steps:
      try:
        state = self._restore_verified(step, abstract_state)
      except _Damaged as e:
        if on_corrupt == "stop":
          raise CheckpointCorruptError(self._damaged(step, str(e))) from None
        logging.warning("the checkpoint of step %d in %s is damaged: %s; falling back to an earlier one "
                        "(on_corrupt_checkpoint=fallback)", step, self.directory, e)
        continue
      self._set_aside([s for s in steps if s > step], f"damaged: resumed from step {step}")
      return state
    if steps:
      raise CheckpointCorruptError(f"none of the checkpoints {sorted(steps)} in {self.directory} is intact")
    return None

  def _set_aside(self, steps: list, why: str) -> None:
    """Moves steps out of the checkpoint directory (to SET_ASIDE_DIR) so that the run can write those steps again."""
    if not steps:
      return
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, SET_ASIDE_DIR), exist_ok=True)
      for step in steps:
        target = os.path.join(self.workdir, SET_ASIDE_DIR, str(step))
        while os.path.exists(target):
          target += "_"
        shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("volo_jax checkpoints set aside")
    self.manager.reload()
    logging.warning("checkpoints of steps %s moved to %s (%s)", sorted(steps), os.path.join(self.workdir,
                                                                                           SET_ASIDE_DIR), why)

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    self.wait()  # an earlier save's failure is reported with its own step
    self._saving = step
    with self._write_errors(step):
      started = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    if started:
      self._in_flight = step
    return started

  def wait(self) -> None:
    """Blocks until the save in flight is complete on disk."""
    with self._write_errors(self._in_flight):
      self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.wait()
    self.manager.close()

  @contextlib.contextmanager
  def _write_errors(self, step):
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:  # orbax and tensorstore raise all three for I/O failures
      kept = [s for s in self.manager.all_steps() if s != step] if os.path.isdir(self.directory) else []
      raise CheckpointWriteError(f"cannot write the checkpoint of step {step} in {self.directory}: "
                                 f"{first_line(e)}; the checkpoints of steps {kept or 'none'} are intact") from e


class _Damaged(Exception):
  """What is wrong with a checkpoint's files, inside Checkpointer."""




def load_pretrained(model, path: str) -> mapping.LoadReport:
  """Fills `model` from a PyTorch file (.pth/.pth.tar/.safetensors), a `volo_jax.convert torch2flax` directory,
  or a training workdir of ours, or a Hub name (hf-hub:<repo>, volo_d1_224.sail_in1k: the cached download); pos_embed
  is resized and heads reset as the official fine-tuning loader does. A segmenter takes a whole segmenter's
  weights, or a classifier's into its backbone."""
  from volo_jax import hub  # pylint: disable=import-outside-toplevel
  if hub.is_hub_name(path):
    path = hub.weights_file(path)
  if flax_io.is_model_checkpoint(path):
    source = flax_io.load_model_checkpoint(path)
  elif os.path.isfile(os.path.join(path, CONFIG_JSON)):
    with open(os.path.join(path, CONFIG_JSON)) as f:
      source = _model_from_workdir(path, json.load(f))
  elif os.path.isdir(path):
    raise CheckpointError(f"{path}: neither a converted weights directory nor a training workdir")
  elif isinstance(model, VoloUperNet):
    return _load_segmenter_tensors(model, mapping.read_state_dict(path))
  else:
    return mapping.load_torch_weights(model, path)
  if isinstance(model, VoloUperNet):
    tensors = (segmenter_convert.state_dict(source) if isinstance(source, VoloUperNet)
               else mapping.state_dict(source))
    return _load_segmenter_tensors(model, tensors)
  if isinstance(source, VoloUperNet):
    raise CheckpointError(f"{path} holds a segmentation model: a classifier cannot load it")
  return mapping.load_state_dict(model, mapping.state_dict(source))


def _load_segmenter_tensors(model: VoloUperNet, tensors: dict) -> mapping.LoadReport:
  """A whole segmenter's state dict (backbone., neck., decode_head., auxiliary_head.) or a classifier's (into the
  backbone only)."""
  if any(k.startswith("backbone.") for k in tensors):
    return segmenter_convert.load_state_dict(model, tensors)
  return segmenter_convert.load_backbone_state_dict(model, tensors)


def _model_from_workdir(workdir: str, run_config: dict):
  """The params and batch stats of a training workdir's latest checkpoint, as a (host-resident) model: the run's
  classifier, or its segmenter for a segmentation run."""
  model_config = run_config["model"]
  if run_config.get("task") == "segmentation":
    s = run_config["segmentation"]
    source = create_segmenter(model_config["name"], model_config["num_classes"], img_size=model_config["img_size"],
                              channels=s["channels"], aux_channels=s["aux_channels"],
                              scan_blocks=model_config.get("scan_blocks", False))
  else:
    source = create_model(model_config["name"], img_size=model_config["img_size"],
                          num_classes=model_config["num_classes"],
                          scan_blocks=model_config.get("scan_blocks", False))
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{workdir}: training workdir without a checkpoint")
  problem = check_step(directory, step, what="read")
  if problem:
    intact = newest_intact(directory, manager.all_steps(), below=step)
    hint = f"the newest intact one is step {intact}" if intact is not None else "no intact checkpoint is left"
    raise CheckpointError(f"{workdir}: the checkpoint of step {step} is damaged: {problem}; {hint}")
  weights = {"params": nnx.state(source, nnx.Param), "batch_stats": nnx.state(source, nnx.BatchStat)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, weights)
  try:
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract),
        partial_restore=True))
  except Exception as e:  # orbax/tensorstore raise many types for truncated or mismatched checkpoints
    raise CheckpointError(f"{workdir}: cannot restore the checkpoint of step {step} into {model_config['name']}: "
                          f"{first_line(e)}") from None
  nnx.update(source, restored["params"], restored["batch_stats"])
  return source
