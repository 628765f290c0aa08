"""Token labeling end to end on `imagenet2012` built by TFDS from fake archives: label maps written in the
released format (torch.save'd float16 [2, 5, 18, 18] per image), `prepare` and `verify`, the pipeline's
(image, label map) alignment, and a few training steps on 8 devices with token labeling and MixToken on."""

import glob
import io
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from torch_reference import torch
import tensorflow_datasets as tfds
from configs import imagenet
from volo_jax import token_labels
from volo_jax.data import pipeline
from volo_jax.train import loop, token_label_targets

CLASSES = ["n01440764", "n01443537"]  # ImageNet indices 0 and 1
MAP_SIZE, TOPK, PATTERN_OFFSET = 18, 5, 10
SHAPES = [(120, 160), (150, 110), (128, 128), (100, 140)]  # (height, width) of each class's images


def _gradient_jpeg(height: int, width: int) -> bytes:
  """Red encodes the column, green the row, as fractions of the image: a pixel's colour says where it was."""
  x = (np.arange(width) + 0.5) / width
  y = (np.arange(height) + 0.5) / height
  photo = np.stack([np.broadcast_to(x[None], (height, width)), np.broadcast_to(y[:, None], (height, width)),
                    np.full((height, width), 0.5)], -1)
  buffer = io.BytesIO()
  Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _released_map(rng) -> "torch.Tensor":
  """float16 [2, 5, S, S] as released; the top class of cell (r, c) is PATTERN_OFFSET + r·S + c."""
  scores = np.empty((TOPK, MAP_SIZE, MAP_SIZE), np.float32)
  scores[0] = 8.0
  scores[1:] = np.sort(rng.uniform(-6, -3, (TOPK - 1, MAP_SIZE, MAP_SIZE)), axis=0)[::-1]  # below absent (0)
  classes = np.empty_like(scores)
  classes[0] = PATTERN_OFFSET + np.arange(MAP_SIZE * MAP_SIZE).reshape(MAP_SIZE, MAP_SIZE)
  classes[1:] = 500 + rng.permutation(400)[:TOPK - 1, None, None]  # distinct, outside the pattern
  return torch.from_numpy(np.stack([scores, classes])).half()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(TFDS data_dir, released-format label dir, training file names)."""
  root = tmp_path_factory.mktemp("token_labels")
  manual, label_dir = root / "manual", root / "released"
  manual.mkdir()
  rng = np.random.default_rng(0)
  names = []
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for wnid in CLASSES:
      inner = io.BytesIO()
      (label_dir / wnid).mkdir(parents=True)
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for i, (height, width) in enumerate(SHAPES):
          name = f"{wnid}_{i}.JPEG"
          _add(class_tar, name, _gradient_jpeg(height, width))
          torch.save(_released_map(rng), label_dir / wnid / f"{wnid}_{i}.pt")
          names.append(name)
      _add(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(2):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _gradient_jpeg(*SHAPES[i]))
  data_dir = str(root / "tfds")
  tfds.builder("imagenet2012", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return data_dir, str(label_dir), names


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
  _, label_dir, _ = data
  out = str(tmp_path_factory.mktemp("prepared"))
  assert token_labels.main(["prepare", "--label-dir", label_dir, "--out", out, "--num-shards", "2",
                            "--workers", "1"]) == 0
  return out


def _config(data_dir: str, labels: str, total_steps: int = 2):
  config = imagenet.get_config("volo_d1_224")
  config.data.data_dir = data_dir
  config.model.name = "volo_tiny"
  config.model.img_size = 64
  config.token_label.size = 4
  config.token_label.dir = labels
  config.batch_size = 8
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.data.shuffle_buffer = 16
  config.mesh.fsdp = 2  # 4 × 2 on the 8 test devices
  return config


def test_verify_reports_missing_extra_and_corrupt(data, prepared, tmp_path):
  data_dir, label_dir, names = data
  report = token_labels.verify(prepared, data_dir=data_dir)
  assert (report["maps"], report["images"]) == (8, 8)
  assert not (report["missing"] or report["extra"] or report["corrupt"] or report["duplicates"])
  assert token_labels.main(["verify", "--labels", prepared, "--data-dir", data_dir]) == 0  # the CLI: exit 0
  # A broken release: one file truncated, one deleted, one image with no training example.
  broken = tmp_path / "broken"
  for wnid in CLASSES:
    (broken / wnid).mkdir(parents=True)
    for pt in sorted(os.listdir(os.path.join(label_dir, wnid))):
      with open(os.path.join(label_dir, wnid, pt), "rb") as f:
        (broken / wnid / pt).write_bytes(f.read())
  (broken / CLASSES[0] / f"{CLASSES[0]}_1.pt").write_bytes(b"not a torch file")
  (broken / CLASSES[1] / f"{CLASSES[1]}_2.pt").unlink()
  torch.save(_released_map(np.random.default_rng(1)), broken / CLASSES[1] / f"{CLASSES[1]}_99.pt")
  summary = token_labels.prepare(str(broken), str(tmp_path / "out"), num_shards=3)
  assert list(summary["corrupt"]) == [str(broken / CLASSES[0] / f"{CLASSES[0]}_1.pt")]
  report = token_labels.verify(str(tmp_path / "out"), file_names=names)
  assert report["missing"] == [f"{CLASSES[0]}_1.JPEG", f"{CLASSES[1]}_2.JPEG"]
  assert report["extra"] == [f"{CLASSES[1]}_99.JPEG"]
  # Corruption inside a prepared shard (a class index out of range) is found too.
  classes = np.load(tmp_path / "out" / "classes-00000-of-00003.npy")
  classes[0, 0, 0, 0] = 1000
  np.save(tmp_path / "out" / "classes-00000-of-00003.npy", classes)
  assert list(token_labels.verify(str(tmp_path / "out"), file_names=names)["corrupt"]) == [f"{CLASSES[0]}_0.JPEG"]


def test_pipeline_label_maps_are_cropped_and_flipped_like_the_image(data, prepared):
  """Every token's target (geometric box) points at the map cell that the image's pixels come from. Targets on
  a 16×16 grid of 4-pixel tokens (finer than the model's 4×4): one RoIAlign sample per bin, at its centre."""
  data_dir, _, _ = data
  config = _config(data_dir, prepared)
  config.data.randaugment, config.data.random_erase = "", 0.0  # keep the colours that encode positions
  batches = pipeline.train_dataset(config, local_batch=6, start_step=0, process_index=0, process_count=1)
  first, second = next(batches), next(batches)
  resumed = next(pipeline.train_dataset(config, local_batch=6, start_step=1, process_index=0, process_count=1))
  for key in second:  # exact resume covers the label maps, boxes and flips too
    np.testing.assert_array_equal(resumed[key], second[key])
  batch = {k: np.concatenate([first[k], second[k]]) for k in first}
  assert batch["label_scores"].shape == (12, TOPK, MAP_SIZE, MAP_SIZE) and batch["label_scores"].dtype == np.float16
  assert batch["label_classes"].dtype == np.int16 and batch["crop_box"].shape == (12, 4)
  assert 0 < batch["flip"].sum() < 12 and (batch["crop_box"][:, 2:] < 0.99).any()
  # Position of each 16×16 token in the original image, read from its colours (ImageNet-normalised).
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  pixels = batch["image"] * std + mean  # (B, 64, 64, 3) in [0, 1]
  tokens = pixels.reshape(12, 16, 4, 16, 4, 3).mean(axis=(2, 4))  # (B, 16, 16, 3)
  from_image = tokens[..., :2]  # (x, y)

  def from_targets(transposed_box):
    targets = token_label_targets.build_targets({k: jnp.asarray(v) for k, v in batch.items()}, num_classes=1000,
                                                token_size=16, smoothing=0.1, transposed_box=transposed_box)
    cell = np.asarray(targets["tokens"]).argmax(-1).reshape(12, 16, 16) - PATTERN_OFFSET
    assert (0 <= cell).all() and (cell < MAP_SIZE ** 2).all()
    return np.stack([cell % MAP_SIZE, cell // MAP_SIZE], -1) / MAP_SIZE + 0.5 / MAP_SIZE  # (x, y)

  error = np.abs(from_targets(transposed_box=False) - from_image)
  assert error.max() < 1.0 / MAP_SIZE  # the nearest cell (½ cell) plus JPEG/resize colour noise
  # tlt's box (the default) samples the crop mirrored about the diagonal: far off for non-square crops.
  assert np.abs(from_targets(transposed_box=True) - from_image).max() > 4 / MAP_SIZE


def test_training_steps_with_token_labels_and_mix_token(data, prepared, tmp_path):
  """The ImageNet recipe (RandAugment, random erasing, drop path, token labels, MixToken) on 8 devices, from
  the prepared released-format maps, eval on both validation images."""
  data_dir, _, _ = data
  workdir = str(tmp_path / "run")
  metrics = loop.train_and_evaluate(_config(data_dir, prepared), workdir)
  assert metrics["count"] == 2 and os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  losses = [float(tf.make_ndarray(v.tensor)) for f in glob.glob(os.path.join(workdir, "tensorboard", "*"))
            for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value if v.tag == "train/loss"]
  # Near-uniform logits at init: CE ≈ ln 1000 for the class term plus 0.5 × ln 1000 for the token term.
  assert len(losses) == 2 and all(1.3 * np.log(1000) < loss < 1.7 * np.log(1000) for loss in losses)


def test_imagenet_configs_carry_the_token_label_recipe():
  """The official runs: size 14 at 224, 24 at 384, 28 at 448 (32 at 512, the authors' img/16), ground-truth
  mixing for the fine-tunes only, TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0), MixToken on."""
  sizes = {224: 14, 384: 24, 448: 28, 512: 32}
  for name in imagenet.EXPERIMENTS:
    config = imagenet.get_config(name)
    tl = config.token_label
    assert tl.enabled and tl.mix_token and tl.transposed_box
    assert tl.size == sizes[config.model.img_size] and tl.ground_truth == config.finetune
    assert (tl.dense_weight, tl.cls_weight) == (0.5, 1.0)
