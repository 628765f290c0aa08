"""volo_jax.data.folder: an image folder becomes a TFDS dataset that `tfds.builder(name, data_dir=...)` finds, with
timm's class order and split names, the class names in its ClassLabel, undecodable files left out; bad input is
one line and exit 2 with nothing written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from volo_jax.data import folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path: str, fmt: str = "png", seed: int = 0) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
  data = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image)
  with open(path, "wb") as f:
    f.write(data.numpy())


def test_class_folders_become_a_tfds_dataset_with_timm_order_and_a_stratified_split(tmp_path):
  root = str(tmp_path / "images")
  for label in ("class10", "class2", "Class1"):
    for i in range(10):
      _write(os.path.join(root, label, f"img{i}.{'png' if i % 2 else 'jpg'}"), "png" if i % 2 else "jpeg", i)
  with open(os.path.join(root, "class2", "broken.jpg"), "wb") as f:
    f.write(b"\xff\xd8 not really a jpeg")
  left = []
  result = folder.write_dataset(root, "my_images", str(tmp_path / "data"), val_fraction=0.2, log=left.append)
  assert result["classes"] == ["Class1", "class2", "class10"]  # natural sort, case-insensitive
  assert result["left_out"] == [os.path.join("class2", "broken.jpg")] and "broken.jpg" in left[0]
  builder = tfds.builder("my_images", data_dir=str(tmp_path / "data"))
  assert builder.info.features["label"].names == ["Class1", "class2", "class10"]
  assert builder.info.splits["train"].num_examples == 24 and builder.info.splits["validation"].num_examples == 6
  examples = list(builder.as_dataset(split="validation").as_numpy_iterator())
  assert sorted(int(e["label"]) for e in examples) == [0, 0, 1, 1, 2, 2]
  for e in examples:
    name = e["file_name"].decode()
    assert name.split(os.sep)[0] == result["classes"][e["label"]]
    with open(os.path.join(root, name), "rb") as f:  # the stored image is the file's pixels
      np.testing.assert_array_equal(e["image"], tf.io.decode_image(f.read(), channels=3).numpy())
  assert not [p for p in os.listdir(tmp_path / "data") if p.startswith(".tmp")]


def test_train_and_val_folders_are_the_splits(tmp_path):
  root = str(tmp_path / "images")
  for split, n in (("training", 3), ("validation", 2)):
    for label in ("b", "a"):
      for i in range(n):
        _write(os.path.join(root, split, label, f"{i}.png"))
  result = folder.write_dataset(root, "split_images", str(tmp_path / "data"))
  assert result["sizes"] == {"train": 6, "validation": 4} and result["classes"] == ["a", "b"]
  names = {e["file_name"].decode() for e in tfds.builder("split_images", data_dir=str(tmp_path / "data"))
           .as_dataset(split="validation").as_numpy_iterator()}
  assert os.path.join("validation", "a", "0.png") in names


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "volo_jax.data.folder", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
  one_class, empty = str(tmp_path / "one"), str(tmp_path / "empty")
  _write(os.path.join(one_class, "cat", "0.png"))
  _write(os.path.join(one_class, "cat", "1.png"))
  os.makedirs(os.path.join(empty, "cat"))
  data = str(tmp_path / "data")
  os.makedirs(os.path.join(data, "taken"))
  for args, words in [((one_class, "--name", "x"), "1 class"), ((empty, "--name", "x"), "0 class"),
                      ((str(tmp_path / "missing"), "--name", "x"), "no such directory"),
                      ((one_class, "--name", "taken"), "already exists"),
                      ((one_class, "--name", "mnist"), "catalog"), ((one_class, "--name", "Bad-Name"), "lower case")]:
    run = _cli(*args, "--data-dir", data)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last, run.stderr
  assert sorted(os.listdir(data)) == ["taken"]


def test_the_finetune_config_needs_a_dataset_and_takes_a_hub_name_as_init_from():
  from configs import finetune  # pylint: disable=import-outside-toplevel
  from volo_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from volo_jax.train import validate  # pylint: disable=import-outside-toplevel
  config = finetune.get_config("volo_d1_384")
  assert (config.model.name, config.model.img_size, config.data.crop_pct) == ("volo_d1", 384, 1.0)
  config.init_from = "hf-hub:timm/volo_d1_384.sail_in1k"
  with pytest.raises(ConfigError, match="data.dataset is empty"):
    validate.check_config(config)
  config.data.dataset = "my_images"
  validate.check_config(config)  # a Hub name needs no local file


def test_a_train_folder_alone_is_split_by_class(tmp_path):
  for label in ("b", "a"):
    for i in range(5):
      _write(os.path.join(str(tmp_path), "train", label, f"{i}.png"))
  classes, splits = folder.plan_splits(str(tmp_path), 0.2, 0)
  assert classes == ["a", "b"] and {k: len(v) for k, v in splits.items()} == {"train": 8, "validation": 2}
  assert all(path.startswith("train" + os.sep) for path, _ in splits["validation"])
