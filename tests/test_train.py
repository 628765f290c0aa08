"""End-to-end training on 8 fake CPU devices (mesh data 4 × fsdp 2): the digits set, resume, init_from."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import digits
from conftest import xla_flags
from volo_jax import errors
from volo_jax.train import checkpoint, loop

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir: str, total_steps: int):
  config = digits.get_config()
  config.data.data_dir = data_dir
  config.batch_size = 32
  config.mesh.fsdp = 2
  config.total_steps = total_steps
  config.log_every_steps = 2
  config.eval_every_epochs = 100
  config.checkpoint_every_steps = 3
  return config


def _final_params(workdir: str, config):
  run = loop.describe_run(config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  state = ckpt.restore(ckpt.latest_step(), run.abstract_state)
  ckpt.close()
  return state


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
  """8 uninterrupted steps with drop path on (so the per-step RNG streams matter for resume)."""
  config = tiny_config(data_dir, total_steps=8)
  config.model.drop_path_rate = 0.1
  workdir = str(tmp_path_factory.mktemp("straight"))
  metrics = loop.train_and_evaluate(config, workdir)
  return config, workdir, metrics


def test_digits_training_on_a_4x2_mesh(straight_run):
  config, workdir, metrics = straight_run
  assert jax.device_count() == 8
  assert metrics["count"] == 360 and 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
  state = _final_params(workdir, config)
  assert int(state["step"]) == 8
  # FSDP: a large kernel is split over the 2-way fsdp axis, replicated over data.
  kernel = state["params"]["network"][2][0]["mlp"]["fc1"]["kernel"].get_value()
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"] == {"name": "volo_tiny", "img_size": 32, "drop_path_rate": 0.1, "drop_rate": 0.0,
                                     "pos_drop_rate": 0.0, "attn_drop_rate": 0.0, "dtype": "float32",
                                     "scan_blocks": False, "remat": "none", "num_classes": 10}
  tags = set()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for event_file in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags |= {v.tag for v in event.summary.value}
  assert {"train/loss", "train/lr", "eval/top1", "eval/top5", "perf/images_per_sec"} <= tags


def test_train_py_fine_tunes_from_a_training_workdir_at_another_size(straight_run, data_dir, tmp_path):
  """The command line a user runs: train.py with --config overrides, on 8 devices, starting from a workdir."""
  config, source, _ = straight_run
  target = str(tmp_path / "fine")
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  args = [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir", target,
          f"--config.data.data_dir={data_dir}", "--config.batch_size=32", "--config.mesh.fsdp=2",
          "--config.total_steps=1", "--config.model.img_size=48", f"--config.init_from={source}",
          "--config.seed=5"]  # a fresh init with seed 5 would differ from the source everywhere
  result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "initialised from" in result.stderr and "eval at step 1" in result.stderr
  fine = tiny_config(data_dir, total_steps=1)
  fine.model.img_size, fine.seed = 48, 5
  src, dst = _final_params(source, config), _final_params(target, fine)
  assert dst["params"]["pos_embed"].get_value().shape == (1, 3, 3, 128)
  # The fine-tune started from the source weights: the stem's first conv moved by one small step only.
  before = np.asarray(src["params"]["patch_embed"]["convs"][0]["kernel"].get_value())
  after = np.asarray(dst["params"]["patch_embed"]["convs"][0]["kernel"].get_value())
  assert np.abs(after - before).max() < 0.05 * np.abs(before).max()


def test_fine_tune_config_requires_init_from():
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.ConfigError, match="volo_d1_384 fine-tunes a pretrained model: set --config.init_from"):
    loop.describe_run(imagenet.get_config("volo_d1_384"))
