"""The segmentation run through the one trainer (train/tasks.py, train/segmentation_step.py, the loop): the
eval metrics against an independent numpy scoring of the same weights, resume equal to the uninterrupted run,
2 processes scoring like 1, and bad input refused in one line before the workdir is touched."""

import json
import os
import socket
import subprocess
import sys

import jax
from jax._src import compilation_cache as jax_compilation_cache
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import xla_flags
from configs import segmentation
from volo_jax import errors
from volo_jax.convert import mapping
from volo_jax.data import segmentation_datasets
from volo_jax.models import create_model
from volo_jax.models.upernet import resize_bilinear
from volo_jax.train import checkpoint, loop
from volo_jax.train.preemption import PreemptionWatch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
RUN = {"batch_size": 16, "mesh.fsdp": 2, "log_every_steps": 1, "eval_every_steps": 0, "checkpoint_every_steps": 2,
       "schedule.poly_warmup_steps": 1, "data.eval_split": "test[:40]",
       "cpu.dots": "default"}  # XLA's own dots: their programs enter the persistent compilation cache, oneDNN's not
EVAL_IMAGES = 40  # 3 batches of 16, the last one padded


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache: the three runs' steps compile once."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
    jax.config.update(name, value)
  jax_compilation_cache.reset_cache()
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  jax_compilation_cache.reset_cache()


def seg_config(data_dir: str, total_steps: int, **overrides):
  config = segmentation.get_config("digits")
  config.data.data_dir = data_dir
  config.total_steps = total_steps
  config.update_from_flattened_dict({**RUN, **overrides})
  return config


def _params(workdir: str, config, step: int) -> list[np.ndarray]:
  run = loop.describe_run(config)
  ckpt = checkpoint.Checkpointer(workdir, config)
  state = ckpt.restore(step, run.abstract_state)
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get({k: state[k] for k in ("params", "batch_stats")}))]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
  """4 steps on a 4 × 2 (data × fsdp) mesh of the 8 devices, checkpoints at 2 and 4, evaluated at the end."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  metrics = loop.train_and_evaluate(seg_config(data_dir, 4, eval_every_steps=4), workdir)
  return workdir, metrics


def _numpy_scores(config, workdir: str) -> dict:
  """The test split scored without the pipeline, the canvases or the eval step: each 64×64 image normalised, the
  model's logits resized to the label (PyTorch's bilinear rule), argmax, a numpy confusion matrix."""
  run = loop.describe_run(config, for_training=False)
  model = loop.build_model(config, run.dataset.num_classes)
  checkpoint.load_pretrained(model, workdir)
  model.eval()
  source = segmentation_datasets.source(config.data.dataset)
  ds = tfds.load(config.data.dataset, split=config.data.eval_split, data_dir=config.data.data_dir)
  classes, confusion, count = run.dataset.num_classes, np.zeros((11, 11), np.int64), 0
  forward = jax.jit(lambda x: resize_bilinear(model(x), x.shape[1:3]).argmax(-1))
  for batch in ds.batch(100):
    images = ((batch["image"].numpy() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
    labels = source.train_ids(batch["segmentation"][..., 0]).numpy().astype(np.int64)
    predictions = np.asarray(forward(images))
    keep = labels != 255
    confusion += np.bincount(labels[keep] * classes + predictions[keep], minlength=classes**2).reshape(classes,
                                                                                                       classes)
    count += len(images)
  intersection = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - intersection
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = intersection / union
  return {"miou": np.nanmean(iou), "aacc": intersection.sum() / confusion.sum(), "count": count}


def test_eval_metrics_equal_an_independent_numpy_scoring(straight_run, data_dir):
  workdir, metrics = straight_run
  expected = _numpy_scores(seg_config(data_dir, 4), workdir)
  assert metrics["count"] == expected["count"] == EVAL_IMAGES
  assert metrics["miou"] == pytest.approx(expected["miou"], abs=1e-6)
  assert metrics["aacc"] == pytest.approx(expected["aacc"], abs=1e-6)
  assert set(metrics["iou"]) == set(segmentation_datasets.source("volo_digits_segmentation").class_names)


class _StopAtStep2(PreemptionWatch):
  """The preemption path at step 2, as SIGTERM would take it (the poly schedule depends on total_steps, so a
  shorter run is no interrupted one)."""

  def reached(self, step: int) -> bool:
    return step == 2 or super().reached(step)


def test_resume_equals_the_uninterrupted_run(straight_run, data_dir, tmp_path, monkeypatch):
  workdir, _ = straight_run
  resumed = str(tmp_path / "resumed")
  with monkeypatch.context() as patch:
    patch.setattr(loop, "PreemptionWatch", _StopAtStep2)
    loop.train_and_evaluate(seg_config(data_dir, 4), resumed)
  assert max(checkpoint.finished_steps(resumed)) == 2
  loop.train_and_evaluate(seg_config(data_dir, 4), resumed)
  config = seg_config(data_dir, 4)
  for x, y in zip(_params(resumed, config, 4), _params(workdir, config, 4)):
    np.testing.assert_array_equal(x, y)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_like_one(straight_run, data_dir):
  """evaluate in 2 processes × 2 devices: every image counted once, the same mIoU as the in-process run."""
  workdir, metrics = straight_run
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "volo_jax.evaluate", "--config", "configs/segmentation.py:digits", "--weights", workdir,
       "--distributed", f"--config.data.data_dir={data_dir}", f"--config.batch_size={RUN['batch_size']}",
       f"--config.data.eval_split={RUN['data.eval_split']}", f"--config.cpu.dots={RUN['cpu.dots']}"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))) for i in (0, 1)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  for out, _ in outputs:
    result = json.loads(out.strip().splitlines()[-1])
    assert result["count"] == EVAL_IMAGES
    assert result["miou"] == pytest.approx(metrics["miou"], abs=1e-6)
    assert result["aacc"] == pytest.approx(metrics["aacc"], abs=1e-6)


# ---------------------------------------------------------------------------------------------- bad input


class SegmentationOutOfRange(tfds.core.GeneratorBasedBuilder):
  """8 images whose label maps hold the value 50: no class of the 11 the digits source defines."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="png"),
        "segmentation": tfds.features.Image(shape=(64, 64, 1), encoding_format="png")}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      label = np.zeros((64, 64, 1), np.uint8)
      label[10:20, 10:20] = 50
      yield i, {"image": np.full((64, 64, 3), 3 * i, np.uint8), "segmentation": label}


@pytest.fixture
def out_of_range_source(data_dir, monkeypatch):
  SegmentationOutOfRange(data_dir=data_dir).download_and_prepare()
  digits = segmentation_datasets.source("volo_digits_segmentation")
  monkeypatch.setitem(segmentation_datasets.SOURCES, "segmentation_out_of_range",
                      segmentation_datasets.SegmentationSource(
                          name="segmentation_out_of_range", image_key="image", label_key="segmentation",
                          class_names=digits.class_names, palette=digits.palette, raw_classes=digits.raw_classes,
                          raw_valid=digits.raw_valid))
  return "segmentation_out_of_range"


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
  """A volo_d1 classifier's weights: another architecture than the digits segmenter's volo_tiny backbone."""
  path = str(tmp_path_factory.mktemp("weights") / "volo_d1.safetensors")
  mapping.export_torch_weights(create_model("volo_d1", num_classes=10), path)
  return path


BAD_INPUTS = {
    "not a segmentation dataset": ({"data.dataset": "volo_digits"}, errors.ConfigError,
                                   "unknown segmentation dataset 'volo_digits'"),
    "crop not a multiple of 16": ({"model.img_size": 72}, errors.ConfigError, "not a multiple of VOLO's stride 16"),
    "canvas smaller than the crop": ({"segmentation.eval_canvas": (32, 64)}, errors.ConfigError,
                                     r"eval_canvas \(32, 64\) must be at least the 64 crop"),
    "checkpoint of another architecture": ({"init_from": "{weights}"}, errors.CheckpointError,
                                           r"checkpoint does not fit this model \(wrong variant\?\)"),
    "labels outside the classes": ({"data.dataset": "{labels}", "data.eval_split": "test"}, errors.ConfigError,
                                   "label maps hold values 50 that are no class of its 11"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_in_one_line_leaving_no_workdir(case, data_dir, classifier_weights, tmp_path,
                                                            request):
  overrides, error, message = BAD_INPUTS[case]
  labels = request.getfixturevalue("out_of_range_source") if "{labels}" in str(overrides) else ""
  overrides = {k: v.format(weights=classifier_weights, labels=labels) if isinstance(v, str) else v
               for k, v in overrides.items()}
  workdir = str(tmp_path / "run")
  with pytest.raises(error, match=message) as raised:
    loop.train_and_evaluate(seg_config(data_dir, 2, **overrides), workdir)
  assert "\n" not in str(raised.value).strip()
  assert not os.path.exists(workdir)

