"""Faults the trainer must survive or refuse, each checked against the run that had no fault: two processes vs
one, a checkpoint moved to another mesh, SIGTERM and kill -9 mid-run, NaN loss, a full disk, bad input, corrupt
images, input that decodes nothing or stalls, and damaged checkpoints. Runs use volo_tiny on the digits (8 fake
CPU devices in this process, 4 × 2 mesh) and share one persistent compilation cache, so each distinct program
compiles once for the whole module."""

import glob
import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax._src import compilation_cache

from configs import digits
from conftest import xla_flags
from volo_jax.data import pipeline
from volo_jax import errors
from volo_jax.train import checkpoint, loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The runs' settings, as train.py flags and as config overrides: eval off, a log line (and NaN check) every step.
RUN = {"batch_size": 32, "mesh.fsdp": 2, "model.drop_path_rate": 0.1, "schedule.warmup_epochs": 0,
       "log_every_steps": 1, "eval_every_epochs": 0, "checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """A persistent compilation cache for this process and the train.py subprocesses."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (path, 0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield {name.upper(): str(value) for name, value in zip(names, (path, 0, 0))}
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def run_config(data_dir: str, total_steps: int, **overrides):
  config = digits.get_config()
  config.data.data_dir = data_dir
  config.total_steps = total_steps
  config.update_from_flattened_dict({**RUN, **overrides})
  return config


def train_py(workdir: str, data_dir: str, total_steps: int, **overrides) -> list[str]:
  flags = {**RUN, "data.data_dir": data_dir, "total_steps": total_steps, **overrides}
  return [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", workdir,
          *(f"--config.{k}={v}" for k, v in flags.items())]


def subprocess_env(cache_env: dict, devices: int, **extra) -> dict:
  return dict(os.environ, **cache_env, XLA_FLAGS=xla_flags(devices),
              TF_CPP_MIN_LOG_LEVEL="2", **extra)


def restore(workdir: str, config, step: int | None = None):
  run = loop.describe_run(config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  state = ckpt.restore(ckpt.latest_step() if step is None else step, run.abstract_state)
  ckpt.close()
  return jax.tree.map(np.asarray, jax.device_get(state))


def assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def assert_states_close(a, b, lr: float):
  """Equal to float32 round-off across process layouts and meshes. The all-reduces sum in another order, and
  Adam's division by sqrt(v) magnifies that in near-zero gradient components to a visible part of one update
  (lr) in a few elements, more the more steps follow; so: all but 1 in 10³ elements within 1e-5 (+1e-4
  relative), every one within lr/2 (seen: 8 elements of 3.5 M after 4 steps, 429 after 6 with a mesh change).
  A different batch would move nearly every element by about lr."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  off, total = 0, 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    diff = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    assert diff.max() <= lr / 2
    off, total = off + int((diff > 1e-5 + 1e-4 * np.abs(y)).sum()), total + diff.size
  assert off <= 1e-3 * total, f"{off} of {total} elements differ by more than round-off"


def tensorboard(workdir: str) -> tuple[dict, set]:
  """({tag: {step: value}}, pids of the writing processes) from the workdir's TensorBoard event files."""
  scalars, pids = {}, set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    pids.add(int(re.search(r"\.(\d+)\.\d+\.v2$", path).group(1)))
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return scalars, pids


def checkpoint_steps(workdir: str) -> list[int]:
  return sorted(checkpoint.finished_steps(workdir))


# ---------------------------------------------------------------------------------------------- bad input


def _tree(path: str) -> dict:
  """Every file under path with its size and mtime: 'nothing in the workdir changed' is this staying equal."""
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), path)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def compiles():
  """Counts XLA compilations (the check that bad input is refused before any)."""
  events = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *_, **__: events.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
  return events


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  import volo_jax  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("bad_inputs")
  good = str(root / "tiny.safetensors")
  volo_jax.export_torch_weights(volo_jax.create_model("volo_tiny", img_size=32, num_classes=10), good)
  with open(good, "rb") as f:
    data = f.read()
  with open(root / "truncated.safetensors", "wb") as f:
    f.write(data[: len(data) // 2])
  save_file({"patch_embed.conv.0.weight": np.zeros((3, 3, 3, 3), np.float32)}, str(root / "other.safetensors"))
  (root / "a_file").write_text("not a directory")
  return root


# name: (config overrides, error type, message). An init_from file is read into a host model after the model's
# initialisers ran (op by op, which compiles those small ops), still before the train step compiles.
READS_INIT_FROM = ("init_from truncated", "init_from incompatible")
BAD_INPUTS = {
    "unknown model": ({"model.name": "volo_d9"}, errors.ConfigError, "model.name: unknown model 'volo_d9'"),
    "image size": ({"model.img_size": 40}, errors.ConfigError, "img_size 40 is not a multiple of VOLO's stride 16"),
    "batch size": ({"batch_size": 36}, errors.ConfigError, "batch_size 36 is not divisible by the 8 devices"),
    "data shards": ({"data.shards": 3}, errors.ConfigError, "data.shards=3 must be a multiple"),
    "matmul library": ({"cpu.dots": "mkl"}, errors.ConfigError, "cpu.dots 'mkl': choose one of auto"),
    "negative batch": ({"batch_size": -1}, errors.ConfigError, "batch_size -1 must be positive"),
    "no epochs": ({"schedule.epochs": 0}, errors.ConfigError, "schedule.epochs 0 must be > 0"),
    "nan lr": ({"optimizer.lr": float("nan")}, errors.ConfigError, "optimizer.lr nan must be a finite number"),
    "negative weight decay": ({"optimizer.weight_decay": -0.1}, errors.ConfigError,
                              "optimizer.weight_decay -0.1 must be a finite number ≥ 0"),
    "beta out of range": ({"optimizer.b2": 1.0}, errors.ConfigError, r"optimizer.b2 1.0 must be in \[0, 1\)"),
    "drop rate out of range": ({"model.drop_rate": 1.5}, errors.ConfigError, r"model.drop_rate 1.5 must be in"),
    "remat policy": ({"model.remat": "some"}, errors.ConfigError, "model.remat 'some': choose one of none"),
    "token labels without dir": ({"token_label.enabled": True, "token_label.size": 2}, errors.ConfigError,
                                 "token labeling is on but token_label.dir is empty"),
    "token labels not prepared": ({"token_label.enabled": True, "token_label.size": 2, "token_label.dir": "{root}"},
                                  errors.ConfigError, "no prepared token labels in .*meta.json missing"),
    "token label size": ({"token_label.enabled": True, "token_label.dir": "{root}"}, errors.ConfigError,
                         "token_label.size 14 must be model.img_size/16 = 2"),
    "init_from missing": ({"init_from": "{root}/nothing.pth"}, errors.ConfigError, "no such file or directory"),
    "init_from truncated": ({"init_from": "{root}/truncated.safetensors"}, errors.CheckpointError,
                            "not a readable safetensors file"),
    "init_from incompatible": ({"init_from": "{root}/other.safetensors"}, errors.CheckpointError,
                               "does not fit this model"),
    "dataset not prepared": ({"data.dataset": "mnist", "data.data_dir": "{root}/empty_tfds"}, errors.ConfigError,
                             "not prepared in .*tfds build mnist"),
    "workdir unwritable": ({"workdir": "{root}/a_file/run"}, errors.ConfigError, "is not writable: Not a directory"),
    "negative resume step": ({"resume_step": -1}, errors.ConfigError, "resume_step -1 must be ≥ 0"),
    "corrupt checkpoint mode": ({"on_corrupt_checkpoint": "ignore"}, errors.ConfigError,
                                "on_corrupt_checkpoint 'ignore': choose one of stop, fallback"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_any_compile_leaving_the_workdir_alone(case, data_dir, bad_files, compiles,
                                                                           tmp_path):
  overrides, error, message = BAD_INPUTS[case]
  overrides = {k: v.format(root=bad_files) if isinstance(v, str) else v for k, v in overrides.items()}
  workdir = overrides.pop("workdir", str(tmp_path / "run"))
  before, n_compiles = _tree(str(bad_files)), len(compiles)
  with pytest.raises(error, match=message):
    loop.train_and_evaluate(run_config(data_dir, 4, **overrides), workdir)
  assert case in READS_INIT_FROM or len(compiles) == n_compiles
  assert not os.path.exists(workdir) and _tree(str(bad_files)) == before


def test_resuming_another_model_is_refused_leaving_the_workdir_alone(data_dir, compiles, tmp_path):
  """A workdir holding a run of another model (its config.json, as the trainer writes it) is refused."""
  workdir = str(tmp_path / "run")
  first = run_config(data_dir, 1)
  run = loop.describe_run(first)
  os.makedirs(workdir)
  loop._write_config(first, workdir, run.dataset.num_classes)  # pylint: disable=protected-access
  before, n_compiles = _tree(workdir), len(compiles)
  with pytest.raises(errors.ConfigError, match="holds a run of model"):
    loop.train_and_evaluate(run_config(data_dir, 2, **{"model.img_size": 48}), workdir)
  assert len(compiles) == n_compiles and _tree(workdir) == before


# (train.py arguments after the digits run's own, the one line it must print). Unknown keys and experiments fail
# while absl parses the flags; the others in train_and_evaluate's checks.
CONFIG_FILE = "--config=configs/digits.py"
ONE_LINE_CASES = {
    "image size": ([CONFIG_FILE, "--config.model.img_size=40"],
                   "model.img_size 40 is not a multiple of VOLO's stride 16 (the stem's 8 × the downsample's 2)"),
    "unknown key": ([CONFIG_FILE, "--config.optimizer.lrr=1"],
                    "unknown config key --config.optimizer.lrr (did you mean optimizer.lr?); optimizer has: b1, b2, "
                    "clip_grad, eps, lr, weight_decay"),
    "unknown group": ([CONFIG_FILE, "--config.optimiser.lr=1"],
                      "unknown config key --config.optimiser.lr (did you mean optimizer?); the config has: "),
    "wrong type": ([CONFIG_FILE, "--config.batch_size=big"], "flag --config.batch_size=big: invalid literal for int()"),
    "unknown experiment": (["--config=configs/imagenet.py:volo_d9_224"],
                           "--config configs/imagenet.py:volo_d9_224: unknown experiment 'volo_d9_224'; choose one "
                           "of volo_d1_224, volo_d1_384, "),
    "imagenet without token labels": (["--config=configs/imagenet.py:volo_d1_224"],
                                      "token labeling is on but token_label.dir is empty: "),
    "token labels not prepared": ([CONFIG_FILE, "--config.token_label.enabled=True", "--config.token_label.size=2",
                                   "--config.token_label.dir={tmp}"], "no prepared token labels in "),
}


@pytest.mark.parametrize("case", ONE_LINE_CASES)
def test_train_py_reports_bad_input_in_one_line_with_exit_code_2(case, data_dir, cache_env, tmp_path):
  """Bad input, bad flags included, ends in exactly one error line on stderr (no traceback) and exit code 2."""
  workdir = str(tmp_path / "run")
  args, expected = ONE_LINE_CASES[case]
  flags = [arg.format(tmp=tmp_path) for arg in args] + [f"--config.data.data_dir={data_dir}"] * (
      CONFIG_FILE in args)
  result = subprocess.run([sys.executable, "train.py", *flags, "--workdir", workdir], capture_output=True, text=True,
                          env=subprocess_env(cache_env, 8), cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # Lines naming an error, not libraries' INFO logs (C++ "I…" lines: TensorFlow's oneDNN notice on Intel CPUs
  # mentions "round-off errors").
  errors_lines = [line for line in result.stderr.splitlines()
                  if "error" in line.lower() and not re.match(r"I\d{4} ", line)]
  assert len(errors_lines) == 1 and errors_lines[0].startswith("train.py: error: " + expected), errors_lines
  assert not os.path.exists(workdir)


# ------------------------------------------------------------------------------------------- data order


def _batches(config, start_step: int, n: int, process_index: int = 0, process_count: int = 1):
  it = pipeline.train_dataset(config, local_batch=config.batch_size // process_count, start_step=start_step,
                              process_index=process_index, process_count=process_count)
  return [next(it) for _ in range(n)], it


def test_data_order_after_resume_and_across_process_counts(data_dir):
  """Resuming at step s yields exactly batches s, s+1, … of the uninterrupted stream (same augmentation); with
  data.shards = 2 one process yields the two processes' local batches side by side, each read from its own half."""
  config = run_config(data_dir, 8, **{"data.randaugment": "rand-m9-mstd0.5-inc1", "data.random_erase": 0.25,
                                      "data.hflip": 0.5, "data.shards": 2})
  straight, _ = _batches(config, 0, 5)
  resumed, _ = _batches(config, 3, 2)
  for a, b in zip(straight[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  halves = [_batches(config, 0, 5, process_index=p, process_count=2)[0] for p in (0, 1)]
  for whole, first, second in zip(straight, *halves):
    np.testing.assert_array_equal(whole["image"], np.concatenate([first["image"], second["image"]]))
  assert not np.array_equal(straight[0]["image"], straight[1]["image"])


class _JpegImages(tfds.core.GeneratorBasedBuilder):
  """A one-split dataset of 32×32 JPEG-typed images; subclasses yield the examples (some of them broken bytes).
  Abstract (no _generate_examples), so TFDS does not register it."""

  VERSION = tfds.core.Version("1.0.0")
  NUM_CLASSES = 10

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}


class VoloCorruptDigits(_JpegImages):
  """64 images labelled by their index; every 8th (index 8k+5) is a truncated or non-JPEG byte string."""

  NUM_CLASSES = 64

  def _generate_examples(self):
    for i in range(64):
      image = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
      if i % 8 == 5:
        jpeg = tf.io.encode_jpeg(image).numpy()
        image = io.BytesIO(jpeg[: len(jpeg) // 3] if i % 16 == 5 else b"not a jpeg" * 20)
      yield i, {"image": image, "label": i}


def test_corrupt_images_are_counted_and_skipped(tmp_path):
  config = run_config(str(tmp_path), 8, **{"data.dataset": "volo_corrupt_digits", "data.shuffle_buffer": 1,
                                           "data.train_split": "train", "data.eval_split": "train",
                                           "batch_size": 8, "data.crop_pct": 1.0})
  VoloCorruptDigits(data_dir=str(tmp_path)).download_and_prepare()
  raw = pipeline.builder(config).as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  order = [int(x["label"]) for x in raw.as_numpy_iterator()]  # the file order (shuffle buffer 1 keeps it)
  batches, it = _batches(config, 0, 10)  # 80 delivered: one epoch's 56 good images, then 24 of the next epoch
  labels = np.concatenate([b["label"] for b in batches]).tolist()
  good = [i for i in order if i % 8 != 5]
  assert labels == (good + good)[:80]
  assert it.skipped == 8 + sum(i % 8 == 5 for i in order[:order.index(good[23]) + 1])
  eval_batches, _ = pipeline.eval_dataset(config, local_batch=8, process_index=0, process_count=1)
  assert sum(b["mask"].sum() for b in eval_batches) == 56


# -------------------------------------------------------------------------------------- NaN and disk full


def test_nan_loss_stops_naming_the_step_or_skips_and_counts(data_dir, cache_env, tmp_path):
  """lr 1e38 makes step 1's update overflow the next forward: 'stop' raises at step 2 keeping step 1's
  checkpoint; 'skip' leaves the state at step 1's for the remaining steps and counts them."""
  diverging = {"optimizer.lr": 1e38, "checkpoint_every_steps": 1}
  stop_dir, skip_dir = str(tmp_path / "stop"), str(tmp_path / "skip")
  config = run_config(data_dir, 4, **diverging)
  with pytest.raises(errors.DivergedError, match=r"at step 2: stopped, the last good checkpoint is step 1"):
    loop.train_and_evaluate(config, stop_dir)
  assert checkpoint_steps(stop_dir) == [1]
  skip_config = run_config(data_dir, 4, **diverging, nonfinite="skip")
  loop.train_and_evaluate(skip_config, skip_dir)
  good, skipped = restore(stop_dir, config), restore(skip_dir, config)
  assert int(skipped["step"]) == 4 and int(skipped["skipped_batches"]) == 3 and int(good["skipped_batches"]) == 0
  assert_states_equal({k: v for k, v in good.items() if k not in ("step", "skipped_batches")},
                      {k: v for k, v in skipped.items() if k not in ("step", "skipped_batches")})
  scalars, _ = tensorboard(skip_dir)
  assert scalars["train/skipped_batches"] == {2: 1.0, 3: 2.0, 4: 3.0}


@pytest.fixture
def small_disk(tmp_path):
  """A 36 MiB tmpfs: room for two checkpoints of the tiny run (14 MiB each) but not a third."""
  mount = tmp_path / "disk"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=36m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
  if result.returncode:
    pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}): needs root in a container "
                "that allows mounts")
  yield str(mount)
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_at_save_is_a_clear_error_and_keeps_the_earlier_checkpoints(data_dir, cache_env, small_disk):
  workdir = os.path.join(small_disk, "run")
  config = run_config(data_dir, 6)
  with pytest.raises(errors.CheckpointWriteError,
                     match=r"checkpoint of step 4 in .*: .*No space left.*steps \[1, 2\] are intact"):
    loop.train_and_evaluate(config, workdir)
  assert checkpoint_steps(workdir) == [1, 2]
  state = restore(workdir, config)
  assert int(state["step"]) == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))


# ------------------------------------------------------------------------------ SIGTERM and kill -9 (slow)


class Run:
  """train.py in a subprocess; stderr is collected by a thread so that the test can wait for a log line."""

  def __init__(self, args: list[str], env: dict):
    self.lines, self.started = [], time.time()
    self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                 cwd=REPO_ROOT)
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
    self._reader.start()

  def wait_for_step(self, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not any(re.search(rf"step {step}/\d+ ", line) for line in self.lines):
      assert self.proc.poll() is None and time.time() < deadline, "".join(self.lines[-30:])
      time.sleep(0.05)

  def finish(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout=timeout)
    self._reader.join()
    return rc

  def log(self) -> str:
    return "".join(self.lines)


@pytest.mark.slow
def test_sigterm_and_kill_9_resume_to_the_uninterrupted_parameters(data_dir, cache_env, tmp_path):
  """SIGTERM at step ≥ 3 → checkpoint of that step, exit 0; restart, kill -9 while a checkpoint is being
  written; restart → resumes from the last complete checkpoint and ends bit-for-bit at the 24-step run (enough
  steps left after each signal that a fast machine cannot finish first)."""
  total = 24
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  config = run_config(data_dir, total)
  # Runs that need no periodic checkpoints save only their last step (a save costs ≈ 2.5 s here).
  loop.train_and_evaluate(run_config(data_dir, total, checkpoint_every_steps=total), straight)
  env = subprocess_env(cache_env, 8)

  run = Run(train_py(broken, data_dir, total), env)
  run.wait_for_step(3)
  sent = time.time()
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish(timeout=60) == 0, run.log()[-3000:]
  grace = time.time() - sent
  stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", run.log()).group(1))
  # Saved and gone well before the end (a quiet run takes ≈ 5 s; 43 s was seen with the other CI worker busy).
  assert 3 <= stopped < total and checkpoint_steps(broken)[-1] == stopped and grace < 60

  run = Run(train_py(broken, data_dir, total, checkpoint_every_steps=1), env)
  run.wait_for_step(stopped + 2)
  directory, partial = os.path.join(broken, "checkpoints"), []
  deadline = time.time() + 120
  while not partial and run.proc.poll() is None and time.time() < deadline:
    partial = [n for n in os.listdir(directory) if "tmp" in n]
  run.proc.kill()
  run.finish()
  killed_at = max(int(m) for m in re.findall(r"step (\d+)/\d+ ", run.log()))
  assert partial, "no save was in flight when the process was killed"
  complete = checkpoint_steps(broken)[-1]
  assert stopped <= complete < total

  run = Run(train_py(broken, data_dir, total, checkpoint_every_steps=total), env)
  assert run.finish() == 0, run.log()[-3000:]
  assert f"resuming from step {complete}" in run.log()
  assert_states_equal(restore(straight, config), restore(broken, config))
  print(f"SIGTERM after step 3: saved step {stopped}, exit 0 after {grace:.1f}s; kill -9 at step {killed_at} "
        f"during the save of {partial}: resumed from {complete}; final state bit-exact")


# --------------------------------------------------------------------------------- multi-process (slow)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_and_the_checkpoint_moves_to_a_2_device_mesh(data_dir, cache_env, tmp_path):
  """2 processes × 4 devices (4 × 2 mesh) for 4 steps == 1 process × 8 devices with the same 2 data shards;
  then 1 process × 2 devices (1 × 2 mesh) continues that checkpoint to step 6 == the 6-step single run."""
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "multi")
  config = run_config(data_dir, 6, **{"data.shards": 2, "checkpoint_every_steps": 4})  # saves steps 4 and 6
  loop.train_and_evaluate(config, reference)
  port = _free_port()
  runs = [Run(train_py(workdir, data_dir, 4, checkpoint_every_steps=4), subprocess_env(
      cache_env, 4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
          for i in (0, 1)]
  for i, run in enumerate(runs):
    assert run.finish() == 0, run.log()[-3000:]
    assert f"process {i}/2, 4 local / 8 global devices" in run.log()
    assert f"process {i} reads shard(s) [{i}] of 2 of 'train'" in run.log()
  # Only process 0 writes TensorBoard; both write their shards of every checkpoint.
  scalars, pids = tensorboard(workdir)
  assert pids == {runs[0].proc.pid}
  for step in checkpoint_steps(workdir):
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(workdir, "checkpoints",
                                                                                 str(step), "default")))
  expected, _ = tensorboard(reference)
  steps = [1, 2, 3, 4]
  np.testing.assert_allclose([scalars["train/loss"][s] for s in steps], [expected["train/loss"][s] for s in steps],
                             rtol=1e-5)
  assert_states_close(restore(workdir, config, 4), restore(reference, config, 4), lr=config.optimizer.lr)

  two_devices = Run(train_py(workdir, data_dir, 6, **{"data.shards": 2}), subprocess_env(cache_env, 2))
  assert two_devices.finish() == 0, two_devices.log()[-3000:]
  assert "resuming from step 4" in two_devices.log() and "on 2 devices, 1 processes" in two_devices.log()
  scalars, _ = tensorboard(workdir)
  np.testing.assert_allclose([scalars["train/loss"][s] for s in (5, 6)], [expected["train/loss"][s] for s in (5, 6)],
                             rtol=1e-5)
  assert_states_close(restore(workdir, config, 6), restore(reference, config, 6), lr=config.optimizer.lr)


# ------------------------------------------------------------------------------------ damaged checkpoints


class VoloPartlyCorrupt(_JpegImages):
  """The digits' shapes and classes, 160 random images of which every 5th does not decode (20%)."""

  def _generate_examples(self):
    for i in range(160):
      image = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {"image": io.BytesIO(b"not a jpeg" * 20) if i % 5 == 0 else image, "label": i % 10}


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture(scope="module")
def saved_run(data_dir, cache_env, tmp_path_factory):
  """A 4-step run on images of which 20% do not decode, with checkpoints at steps 1, 2 and 4, each with its
  integrity record; returns the workdir and the run's log lines."""
  workdir = str(tmp_path_factory.mktemp("saved") / "run")
  VoloPartlyCorrupt(data_dir=data_dir).download_and_prepare()
  lines = _Lines()
  logging.getLogger("absl").addHandler(lines)
  try:
    loop.train_and_evaluate(run_config(data_dir, 4, **PARTLY_CORRUPT), workdir)
  finally:
    logging.getLogger("absl").removeHandler(lines)
  assert checkpoint_steps(workdir) == [1, 2, 4]
  return workdir, lines.lines


@pytest.fixture(scope="module")
def abstract_state(data_dir):
  """The restore target of the runs' train state."""
  return loop.describe_run(run_config(data_dir, 4)).abstract_state


PARTLY_CORRUPT = {"data.dataset": "volo_partly_corrupt", "data.train_split": "train", "data.eval_split": "train"}


def test_twenty_percent_corrupt_images_train_and_warn_naming_the_first_error(saved_run):
  """saved_run trained its 4 steps (checked there) and warned about the dropped images at each log line."""
  _, lines = saved_run
  warnings = [m for level, m in lines if "training examples" in m and level == "WARNING"]
  assert warnings and all(re.match(r"process 0: \d+ of the last \d+ training examples \(\d+%\) were dropped, \d+ in "
                                   r"all; the first error: 'volo_partly_corrupt' split 'train', example \d+: .*JPEG",
                                   m) for m in warnings), warnings


def _state_file(step_dir: str, kind: str) -> str:
  """The largest file of step_dir matching the glob `kind` (a data file's name is a hash)."""
  return max(glob.glob(os.path.join(step_dir, "default", kind)), key=os.path.getsize)


def _damage(path: str, how: str) -> None:
  with open(path, "rb") as f:
    data = bytearray(f.read())
  if how == "truncated":
    data = data[: len(data) // 2]
  else:  # one bit in the middle
    data[len(data) // 2] ^= 0x10
  with open(path, "wb") as f:
    f.write(bytes(data))


# Every kind of file orbax writes for our state: array data (OCDBT data files, the per-process and top manifests),
# the tree and sharding metadata, the per-array metadata and the commit marker.
STATE_FILES = ("ocdbt.process_0/d/*", "d/*", "manifest.ocdbt", "ocdbt.process_0/manifest.ocdbt", "_METADATA",
               "_sharding", "array_metadatas/process_0", "commit_success.txt")


@pytest.mark.parametrize("how", ("truncated", "bit-flipped"))
@pytest.mark.parametrize("kind", STATE_FILES)
def test_damaged_latest_checkpoint_stops_naming_the_intact_one(kind, how, saved_run, abstract_state, data_dir,
                                                               tmp_path):
  """The default ('stop'): one line naming the step, the directory, the bad file and the intact step; nothing in
  the workdir changes."""
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run[0], workdir)
  path = _state_file(os.path.join(workdir, "checkpoints", "4"), kind)
  _damage(path, how)
  before = _tree(workdir)
  ckpt = checkpoint.Checkpointer(workdir, run_config(data_dir, 4))
  with pytest.raises(errors.CheckpointCorruptError) as raised:
    ckpt.resume(abstract_state)
  ckpt.close()
  message = str(raised.value)
  assert "\n" not in message
  assert re.fullmatch(
      rf"the checkpoint of step 4 in {re.escape(os.path.join(workdir, 'checkpoints'))} is damaged: "
      rf"default/{re.escape(os.path.relpath(path, os.path.join(workdir, 'checkpoints', '4', 'default')))} "
      rf"(is \d+ bytes, \d+ were written|does not match the SHA-256).*; the newest intact checkpoint is step 2: "
      r"resume from it with --config.resume_step=2 \(or --config.on_corrupt_checkpoint=fallback\)", message), message
  assert _tree(workdir) == before


def test_fallback_and_resume_step_restore_the_intact_checkpoint_setting_the_later_aside(saved_run, data_dir,
                                                                                       tmp_path, caplog):
  config = run_config(data_dir, 4)
  run = loop.describe_run(config)
  expected = restore(saved_run[0], config, 2)
  for name, options in (("fallback", {"on_corrupt": "fallback"}), ("chosen", {"resume_step": 2})):
    workdir = str(tmp_path / name)
    shutil.copytree(saved_run[0], workdir)
    if name == "fallback":
      _damage(_state_file(os.path.join(workdir, "checkpoints", "4"), "ocdbt.process_0/d/*"), "bit-flipped")
    ckpt = checkpoint.Checkpointer(workdir, config)
    caplog.clear()
    state = ckpt.resume(run.abstract_state, **options)
    ckpt.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[-1].startswith("checkpoints of steps [4] moved to ")
    if name == "fallback":
      assert re.fullmatch(r"the checkpoint of step 4 in .* is damaged: default/ocdbt.process_0/d/\w+ does not match "
                          r"the SHA-256 .*; falling back to an earlier one \(on_corrupt_checkpoint=fallback\)",
                          warnings[0]), warnings
    assert_states_equal(jax.tree.map(np.asarray, jax.device_get(state)), expected)
    assert checkpoint_steps(workdir) == [1, 2]
    assert os.listdir(os.path.join(workdir, checkpoint.SET_ASIDE_DIR)) == ["4"]
  with pytest.raises(errors.ConfigError, match=r"resume_step 3: .* holds the checkpoints of steps \[1, 2, 4\]"):
    checkpoint.Checkpointer(saved_run[0], config).resume(run.abstract_state, resume_step=3)


def test_checkpoint_without_integrity_record_restores_with_a_note(saved_run, data_dir, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run[0], workdir)
  for step in (2, 4):
    os.remove(os.path.join(workdir, "checkpoints", str(step), checkpoint.INTEGRITY_JSON))
  config = run_config(data_dir, 4)
  ckpt = checkpoint.Checkpointer(workdir, config)
  with caplog.at_level("INFO"):
    state = ckpt.resume(loop.describe_run(config).abstract_state)
  ckpt.close()
  assert_states_equal(jax.tree.map(np.asarray, jax.device_get(state)), restore(saved_run[0], config, 4))
  notes = [r.getMessage() for r in caplog.records if "integrity record" in r.getMessage()]
  assert notes == ["the checkpoint of step 4 has no integrity record (written by an earlier version): restored "
                   "unverified"]


def test_init_from_a_damaged_workdir_is_refused(saved_run, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run[0], workdir)
  _damage(_state_file(os.path.join(workdir, "checkpoints", "4"), "ocdbt.process_0/d/*"), "truncated")
  model = loop.build_model(run_config(data_dir, 4), 10)
  with pytest.raises(errors.CheckpointError, match=r"the checkpoint of step 4 is damaged: default/ocdbt.process_0/d/"
                     r"\w+ is \d+ bytes, \d+ were written .*; the newest intact one is step 2"):
    checkpoint.load_pretrained(model, workdir)


def test_train_py_stops_on_a_damaged_checkpoint_in_one_line_with_exit_code_1(saved_run, data_dir, cache_env,
                                                                             tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(saved_run[0], workdir)
  _damage(_state_file(os.path.join(workdir, "checkpoints", "4"), "ocdbt.process_0/d/*"), "truncated")
  before = _tree(os.path.join(workdir, "checkpoints"))
  result = subprocess.run(train_py(workdir, data_dir, 6), capture_output=True, text=True,
                          env=subprocess_env(cache_env, 8), cwd=REPO_ROOT, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # Warnings, errors and lines naming an error, not libraries' INFO logs (C++ "I…" lines: TensorFlow's oneDNN
  # notice mentions "round-off errors").
  lines = [line for line in result.stderr.splitlines()
           if re.match(r"[EWF]\d{4} ", line) or ("rror" in line and not re.match(r"I\d{4} ", line))]
  assert len(lines) == 1 and re.search(r"the checkpoint of step 4 in .* is damaged: default/ocdbt.process_0/d/\w+ is "
                                       r"\d+ bytes.*resume_step=2 ", lines[0]), lines
  assert _tree(os.path.join(workdir, "checkpoints")) == before


# ----------------------------------------------------------------------------------- input that yields nothing


class VoloUndecodable(_JpegImages):
  """The digits' shapes and classes, 48 examples of which none decodes."""

  def _generate_examples(self):
    for i in range(48):
      yield i, {"image": io.BytesIO(b"not a jpeg %d" % i * 20), "label": i % 10}


def test_input_that_decodes_nothing_stops_in_one_line_without_a_checkpoint(data_dir, cache_env, tmp_path):
  VoloUndecodable(data_dir=data_dir).download_and_prepare()
  workdir = str(tmp_path / "run")
  config = run_config(data_dir, 4, **{"data.dataset": "volo_undecodable", "data.train_split": "train",
                                      "data.eval_split": "train", "data.shuffle_buffer": 16})
  started = time.time()
  with pytest.raises(errors.InputStalledError) as raised:
    loop.train_and_evaluate(config, workdir)
  message = str(raised.value)
  assert "\n" not in message and re.fullmatch(
      r"no training batch from 'volo_undecodable' split 'train': \d+ examples read, all dropped; the first error: "
      r"'volo_undecodable' split 'train', example 0: .*JPEG.*", message), message
  assert time.time() - started < 60
  assert not os.path.exists(workdir)  # the run found no workdir and leaves none
  os.makedirs(workdir)
  with open(os.path.join(workdir, "notes.txt"), "w") as f:
    f.write("the user's")
  before = _tree(workdir)
  with pytest.raises(errors.InputStalledError):
    loop.train_and_evaluate(config, workdir)
  assert _tree(workdir) == before  # an existing workdir is left as it was


def test_a_stall_after_a_saved_checkpoint_keeps_the_workdir(data_dir, tmp_path, monkeypatch):
  """Only a run that saved nothing is undone: a checkpoint written before the input stalled stays."""
  workdir = str(tmp_path / "run")

  def saves_then_stalls(run, workdir, ckpt, pretrained):
    del run, pretrained
    ckpt.close()
    os.makedirs(os.path.join(workdir, "checkpoints", "2"))
    raise errors.InputStalledError("no training batch")

  monkeypatch.setattr(loop, "_train_loop", saves_then_stalls)
  with pytest.raises(errors.InputStalledError):
    loop.train_and_evaluate(run_config(data_dir, 4), workdir)
  assert checkpoint_steps(workdir) == [2] and os.path.isfile(os.path.join(workdir, "config.json"))


# train.py whose train split stalls: from raw example {limit} of an epoch on, each takes an hour to read.
STALLING_TRAIN_PY = """
import sys, time
sys.path.insert(0, {root!r})
import tensorflow as tf
from absl import app
from volo_jax import flag_errors
from volo_jax.data import pipeline
import train

read = pipeline._read


def stalling_read(config, split, shuffle_seed):
  ds = read(config, split, shuffle_seed)
  if shuffle_seed is None:
    return ds

  def gate(i, example):
    waited = tf.py_function(lambda i: time.sleep(3600) or i if int(i) >= {limit} else i, [i], tf.int64)
    with tf.control_dependencies([waited]):
      return {{k: tf.identity(v) for k, v in example.items()}}

  return ds.enumerate().map(gate)


pipeline._read = stalling_read
app.run(train.main, flags_parser=flag_errors.parser("train.py"))
"""


@pytest.mark.slow
def test_sigterm_while_input_stalls_saves_and_exits_within_seconds_then_resumes(data_dir, cache_env, tmp_path):
  """Two steps read 64 examples; the third batch never comes. SIGTERM then saves step 2 and exits 0 within 10 s;
  the next run resumes from step 2. cpu.dots=default: the runs share the persistent compilation cache."""
  workdir, script = str(tmp_path / "run"), tmp_path / "stalling_train.py"
  script.write_text(STALLING_TRAIN_PY.format(root=REPO_ROOT, limit=64))
  flags = {"data.shuffle_buffer": 1, "checkpoint_every_steps": 100, "cpu.dots": "default"}
  run = Run([sys.executable, str(script), *train_py(workdir, data_dir, 6, **flags)[2:]], subprocess_env(cache_env, 8))
  run.wait_for_step(2)
  time.sleep(2)  # waiting for the third batch by now
  sent = time.time()
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish(timeout=60) == 0, run.log()[-3000:]
  grace = time.time() - sent
  assert grace < 10, run.log()[-3000:]
  assert "SIGTERM while waiting for input: checkpoint of step 2 saved, exiting" in run.log()
  assert checkpoint_steps(workdir)[-1] == 2
  run = Run(train_py(workdir, data_dir, 4, **flags), subprocess_env(cache_env, 8))
  assert run.finish() == 0, run.log()[-3000:]
  assert "resuming from step 2" in run.log() and checkpoint_steps(workdir)[-1] == 4
  print(f"SIGTERM while waiting for the third batch: step 2 saved, exit 0 after {grace:.1f}s; resumed from step 2")


def test_waiting_for_the_first_batch_is_logged_and_gives_way_to_a_stop(data_dir, monkeypatch, caplog):
  """A train split whose reads take 20 s each: a log line every WAIT_LOG_SECS, and get() returns None once its
  stop callback says so."""
  read = pipeline._read  # pylint: disable=protected-access

  def slow_read(config, split, shuffle_seed):
    return read(config, split, shuffle_seed).map(
        lambda ex: {k: tf.identity(v) for k, v in ex.items()} | {"label": tf.py_function(
            lambda label: time.sleep(20) or label, [ex["label"]], tf.int64)})

  monkeypatch.setattr(pipeline, "_read", slow_read)
  monkeypatch.setattr(pipeline, "WAIT_LOG_SECS", 1)
  config = run_config(data_dir, 4)
  batches = pipeline.train_dataset(config, local_batch=32, start_step=0, process_index=0, process_count=1)
  started = time.time()
  with caplog.at_level("INFO"):
    assert batches.get(stop=lambda: time.time() > started + 3.5) is None
  batches.close()
  waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
  assert len(waits) >= 2 and all(re.fullmatch(r"waiting for the first batch for \ds: \d+ examples read, 0 dropped",
                                              m) for m in waits), waits
