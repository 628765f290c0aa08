"""Segmentation data: mmseg's train/test transforms (geometry of image and label together, the cat_max_ratio crop
against a numpy copy of mmseg's loop, ignore and padding values), the raw label → train id tables (Cityscapes
against cityscapesscripts) and the ADE20K and digits TFDS builders."""

import zipfile

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from volo_jax.data import segmentation_datasets, segmentation_transforms
from volo_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from volo_jax.errors import ConfigError


def unnormalize(image: np.ndarray) -> np.ndarray:
  """ImageNet-normalised float → [0, 255] values."""
  return (image * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)) * 255.0


def run_train(image, label, seeds, **options):
  """train_transform over a tf.data map (graph mode, as the pipeline runs it), as numpy dicts."""
  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(seeds, np.int64)).map(
      lambda seed: segmentation_transforms.train_transform(tf.constant(image), tf.constant(label), seed, **options))
  return list(dataset.as_numpy_iterator())


def mmcv_rescale_size(height, width, scale):
  """mmcv.image.rescale_size((w, h), scale) with a (long, short) tuple, as (new_h, new_w)."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def mmseg_crop_choice(label, draws, crop, cat_max_ratio):
  """mmseg 0.x RandomCrop.__call__'s loop over given (top, left) draws: the index of the crop it keeps."""
  index = 0
  if cat_max_ratio < 1.0:
    for _ in range(10):
      top, left = draws[index]
      values, counts = np.unique(label[top:top + crop, left:left + crop], return_counts=True)
      counts = counts[values != 255]
      if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
        break
      index += 1
  return index


def coordinate_image(height, width):
  """uint8 (H, W, 3): red = row, green = column, blue = 255 (marks image pixels against the zero padding)."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([rows, cols, np.full_like(rows, 255)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("height,width,scale", [
    (1024, 2048, (2048, 1024)), (512, 683, (2048, 512)), (375, 500, (2048, 512)), (1024, 2048, (1024, 256)),
    (481, 640, (1536, 384)), (333, 777, (4096, 1024)), (7, 3, (2048, 512)), (640, 427, (2048, 512)),
    (300, 500, (512, 128)), (1024, 2048, (3072, 768)), (999, 1001, (2048, 512))])
def test_keep_ratio_size_matches_mmcv(height, width, scale):
  ours = tuple(int(x) for x in segmentation_transforms.keep_ratio_size(height, width, scale))
  assert ours == mmcv_rescale_size(height, width, scale)


def test_resize_label_is_cv2_nearest():
  label = np.arange(7 * 11, dtype=np.int32).reshape(7, 11)
  for size in [(3, 5), (7, 11), (16, 23), (10, 4)]:
    rows = np.floor(np.arange(size[0]) * 7 / size[0]).astype(int)
    cols = np.floor(np.arange(size[1]) * 11 / size[1]).astype(int)
    np.testing.assert_array_equal(segmentation_transforms.resize_label(tf.constant(label), size),
                                  label[rows][:, cols])


def test_train_transform_keeps_image_and_label_aligned():
  block, rows, cols = 24, 5, 8
  block_ids = np.arange(rows * cols).reshape(rows, cols)
  label = np.kron(block_ids, np.ones((block, block), int)).astype(np.uint8)  # (120, 192)
  colours = np.random.default_rng(0).integers(0, 256, (rows * cols, 3)).astype(np.uint8)
  image = colours[label]
  outputs = run_train(image, label, [[0, i] for i in range(24)], crop=64, scale=(256, 96), ratio_range=(0.5, 2.0),
                      cat_max_ratio=0.75, hflip=0.5, photometric=False)
  padded = 0
  for out in outputs:
    assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.float32
    assert out["label"].shape == (64, 64) and out["label"].dtype == np.int32
    labelled = out["label"] != 255
    # the label covers a top-left rectangle; the rest is padding: label 255, image 0
    valid_rows, valid_cols = labelled.any(axis=1), labelled.any(axis=0)
    np.testing.assert_array_equal(labelled, valid_rows[:, None] & valid_cols[None, :])
    assert valid_rows[:valid_rows.sum()].all() and valid_cols[:valid_cols.sum()].all()
    assert (out["image"][~labelled] == 0).all()
    padded += (~labelled).any()
    # pixels 3 px away from any block edge have their block's colour
    padded_label = np.pad(out["label"], 3, constant_values=255)
    interior = labelled.copy()
    for dy in range(-3, 4):
      for dx in range(-3, 4):
        interior &= padded_label[3 + dy:67 + dy, 3 + dx:67 + dx] == out["label"]
    assert interior.sum() > 100
    np.testing.assert_allclose(unnormalize(out["image"])[interior], colours[out["label"][interior]], atol=0.01)
  assert padded > 0  # some draws were smaller than the crop


def test_crop_choice_matches_mmseg_loop():
  label = np.zeros((200, 200), np.int32)
  label[140:, 140:] = 1  # 9% of the image
  label[:20, :50] = 255
  crop = 64
  kept = []
  for seed in range(40):
    draws = segmentation_transforms.crop_draws(tf.constant([seed, 7], tf.int64), 200, 200, crop).numpy()
    assert draws.shape == (11, 2) and draws.min() >= 0 and draws.max() <= 200 - crop
    for ratio in (0.75, 0.9, 1.0):
      ours = int(segmentation_transforms.chosen_crop(tf.constant(label), tf.constant(draws), crop, ratio))
      assert ours == mmseg_crop_choice(label, draws, crop, ratio), (seed, ratio)
      if ratio == 0.75:
        kept.append(ours)
  assert any(0 < k < 10 for k in kept)  # retries happen and find a balanced crop


def test_train_crop_respects_cat_max_ratio_and_ignore():
  image = coordinate_image(200, 200)
  label = np.zeros((200, 200), np.uint8)
  label[140:, 140:] = 1
  label[60:80, 10:190] = 255
  seeds = [[1, i] for i in range(24)]
  options = dict(crop=64, scale=(200, 200), ratio_range=(1.0, 1.0), hflip=0.0, photometric=False)  # no resize
  for ratio in (0.75, 1.0):
    for seed, out in zip(seeds, run_train(image, label, seeds, cat_max_ratio=ratio, **options)):
      top, left = np.round(unnormalize(out["image"])[0, 0, :2]).astype(int)
      np.testing.assert_array_equal(out["label"], label[top:top + 64, left:left + 64])  # 255 kept as 255
      draws = segmentation_transforms.crop_draws(
          tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), 4)[1], 200, 200, 64).numpy()
      index = mmseg_crop_choice(label, draws, 64, ratio)
      assert (top, left) == tuple(draws[index])
      if ratio == 1.0:
        assert index == 0
      elif index < 10:
        counts = np.bincount(out["label"][out["label"] != 255], minlength=2)
        assert counts.max() / counts.sum() < 0.75


def test_padding_adds_ignore_only_outside_the_image():
  image = coordinate_image(50, 70)
  label = np.random.default_rng(1).integers(0, 5, (50, 70)).astype(np.uint8)
  label[10:20, 30:40] = 255
  seeds = [[2, i] for i in range(8)]
  for out in run_train(image, label, seeds, crop=96, scale=(70, 50), ratio_range=(1.0, 1.0), cat_max_ratio=0.75,
                       hflip=0.5, photometric=False):
    pixels = np.round(unnormalize(out["image"])).astype(int)
    inside = pixels[..., 2] == 255
    assert inside.sum() == 50 * 70
    np.testing.assert_array_equal(out["label"][~inside], 255)
    np.testing.assert_array_equal(out["image"][~inside], 0)
    rows, cols = pixels[inside, 0], pixels[inside, 1]
    np.testing.assert_array_equal(out["label"][inside], label[rows, cols])


def test_photometric_changes_the_image_only():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (90, 130, 3)).astype(np.uint8)
  label = rng.integers(0, 4, (90, 130)).astype(np.uint8)
  seeds = [[3, i] for i in range(12)]
  options = dict(crop=64, scale=(160, 96), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, hflip=0.5)
  plain = run_train(image, label, seeds, photometric=False, **options)
  distorted = run_train(image, label, seeds, photometric=True, **options)
  changed = 0
  for a, b in zip(plain, distorted):
    np.testing.assert_array_equal(a["label"], b["label"])
    assert np.isfinite(b["image"]).all()
    values = unnormalize(b["image"])[b["label"] != 255]
    assert values.min() > -0.01 and values.max() < 255.01
    changed += not np.array_equal(a["image"], b["image"])
  assert changed >= 6


def test_eval_transform_shapes_padding_and_fit():
  image = coordinate_image(300, 500)
  label = np.random.default_rng(3).integers(0, 5, (300, 500)).astype(np.uint8)
  scales = (0.5, 1.0, 1.5)
  out = segmentation_transforms.eval_transform(tf.constant(image), tf.constant(label), scale=(512, 128),
                                               canvas=(128, 224), crop=64, test_scales=scales)
  assert tuple(out["size"].numpy()) == (128, 213)  # mmcv: min(512 / 500, 128 / 300) · (300, 500)
  assert out["label"].shape == (128, 224) and out["label"].dtype == tf.int32
  assert (out["label"].numpy()[:, 213:] == 255).all() and (out["label"].numpy()[:, :213] != 255).all()
  expected = {0.5: ((64, 112), (64, 107)), 1.0: ((128, 224), (128, 213)), 1.5: ((192, 336), (192, 320))}
  for s, picture, size in zip(scales, out["images"], out["sizes"]):
    canvas, goal = expected[s]
    assert segmentation_transforms.scale_canvas((128, 224), s, 64) == canvas
    assert picture.shape == (*canvas, 3) and tuple(size.numpy()) == goal
    h, w = goal
    assert (picture.numpy()[h:] == 0).all() and (picture.numpy()[:, w:] == 0).all()
    assert (np.round(unnormalize(picture.numpy()[:h, :w]))[..., 2] == 255).all()
  # larger than the canvas: the original rescaled by min(100 / 300, 160 / 500) = 0.32
  small = segmentation_transforms.eval_transform(tf.constant(image), tf.constant(label), scale=(512, 128),
                                                 canvas=(100, 160), crop=64)
  assert tuple(small["size"].numpy()) == (96, 160) and tuple(small["sizes"][0].numpy()) == (96, 160)
  assert small["label"].shape == (100, 160) and (small["label"].numpy()[96:] == 255).all()
  assert segmentation_transforms.scale_canvas((100, 70), 0.7, 32) == (70, 49)
  assert segmentation_transforms.scale_canvas((100, 70), 0.25, 32) == (32, 32)


def test_cityscapes_table_is_cityscapesscripts():
  labels = pytest.importorskip("cityscapesscripts.helpers.labels").labels
  source = segmentation_datasets.source("cityscapes/semantic_segmentation")
  assert (source.image_key, source.label_key) == ("image_left", "segmentation_label")
  drawn = [label for label in labels if label.id >= 0]  # the license plate (−1) is never drawn into labelIds
  for label in drawn:
    expected = 255 if label.ignoreInEval else label.trainId
    assert source.raw_classes[label.id] == expected, label.name
  assert (source.raw_classes[34:] == 255).all()
  evaluated = sorted((label.trainId, label.name, label.color) for label in drawn if not label.ignoreInEval)
  assert source.class_names == tuple(name for _, name, _ in evaluated)
  np.testing.assert_array_equal(source.palette, [colour for _, _, colour in evaluated])
  np.testing.assert_array_equal(np.flatnonzero(source.raw_valid), np.arange(34))
  mapped = source.train_ids(tf.constant([[7, 33, 0], [26, 9, 255]], tf.uint8)).numpy()
  np.testing.assert_array_equal(mapped, [[0, 18, 255], [13, 255, 255]])


def test_sources_and_invalid_values():
  assert segmentation_datasets.source("ade20k_challenge").num_classes == 150
  assert segmentation_datasets.source("ade20k_challenge").palette.shape == (150, 3)
  digits = segmentation_datasets.source("volo_digits_segmentation")
  assert digits.num_classes == 11 and digits.palette.shape == (11, 3) and digits.palette.dtype == np.uint8
  np.testing.assert_array_equal(digits.invalid_values(np.array([[0, 3, 11], [200, 10, 11]], np.uint8)), [11, 200])
  assert digits.invalid_values(np.arange(11, dtype=np.uint8)).size == 0
  with pytest.raises(ConfigError, match="unknown segmentation dataset 'nope'; known: ade20k_challenge"):
    segmentation_datasets.source("nope")


def write_fake_ade20k(path):
  """A tiny ADEChallengeData2016.zip: 3 train and 2 validation JPEGs with PNG labels holding 0 and 150.
  Returns {file stem: (jpeg bytes, label (H, W))}."""
  rng = np.random.default_rng(4)
  examples = {}
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("ADEChallengeData2016/objectInfo150.txt", "not an image")
    for folder, count in (("training", 3), ("validation", 2)):
      for i in range(count):
        stem = f"ADE_{'train' if folder == 'training' else 'val'}_{i + 1:08d}"
        height, width = 20 + 3 * i, 30 - 2 * i
        jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (height, width, 3)).astype(np.uint8)).numpy()
        label = rng.integers(0, 151, (height, width)).astype(np.uint8)
        label[0, :2] = (0, 150)
        zf.writestr(f"ADEChallengeData2016/images/{folder}/{stem}.jpg", jpeg)
        zf.writestr(f"ADEChallengeData2016/annotations/{folder}/{stem}.png", tf.io.encode_png(label[..., None]).numpy())
        examples[stem] = (jpeg, label)
  return examples


def test_ade20k_builder_on_a_fake_archive(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  examples = write_fake_ade20k(manual / "ADEChallengeData2016.zip")
  builder = segmentation_datasets.Ade20kChallenge(data_dir=str(tmp_path / "data"))
  assert builder.name == "ade20k_challenge"
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 3, "validation": 2}
  seen = set()
  for split in ("train", "validation"):
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(dataset):
      stem = example["file_name"].decode()[:-len(".jpg")]
      jpeg, label = examples[stem]
      assert example["image"] == jpeg  # the JPEG is stored byte for byte
      np.testing.assert_array_equal(example["segmentation"][..., 0], label)
      seen.add(stem)
  assert seen == set(examples)
  source = segmentation_datasets.source("ade20k_challenge")
  np.testing.assert_array_equal(source.train_ids(tf.constant([0, 1, 75, 150], tf.uint8)), [255, 0, 74, 149])
  assert source.invalid_values(np.array([0, 150, 151], np.uint8)).tolist() == [151]


def test_digits_builder(tmp_path):
  builder = segmentation_datasets.VoloDigitsSegmentation(data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 2000, "test": 500}
  source = segmentation_datasets.source("volo_digits_segmentation")
  values = set()
  for split in ("train", "test"):
    for example in tfds.as_numpy(builder.as_dataset(split=split, batch_size=500)):
      label = example["segmentation"][..., 0]
      assert example["image"].shape[1:] == (64, 64, 3) and label.shape[1:] == (64, 64)
      np.testing.assert_array_equal(label > 0, example["image"].max(-1) >= segmentation_datasets.INK_LEVEL)
      assert ((label > 0).mean(axis=(1, 2)) > 0.02).all()  # every canvas has ink
      assert source.invalid_values(label).size == 0
      values |= set(np.unique(label).tolist())
  assert values == set(range(11))


def test_digits_canvases_are_deterministic():
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  canvases = [segmentation_datasets.paste_digits(digits.images, digits.target, np.arange(100),
                                                 np.random.default_rng(5)) for _ in range(2)]
  for a, b in zip(*canvases):
    np.testing.assert_array_equal(a, b)
