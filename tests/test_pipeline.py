"""The input pipeline on `imagenet2012` built by TFDS itself from fake manual-download tars that hold real JPEGs
(a grayscale, a CMYK and a PNG-in-.JPEG among them, as in the real archives). The ImageNet recipe's training
run (token labels on) is in test_token_labels.py."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

import tensorflow_datasets as tfds
from configs import imagenet
from volo_jax.data import pipeline

CLASSES = ["n01739381", "n02105855", "n01440764"]
CMYK_NAME, PNG_NAME = "n01739381_1309.JPEG", "n02105855_2933.JPEG"  # names TFDS knows to repair


def _jpeg(photo: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(photo).convert(mode).save(buffer, format=fmt, quality=90)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  manual = root / "manual"
  manual.mkdir()
  photos = [load_sample_image(n)[y:y + 200, x:x + 260] for n in ("china.jpg", "flower.jpg")
            for y, x in ((0, 0), (150, 300))]
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for c, wnid in enumerate(CLASSES):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as class_tar:
        for i, photo in enumerate(photos):
          name, data = f"{wnid}_{i}.JPEG", _jpeg(photo)
          if (c, i) == (0, 0):
            name, data = CMYK_NAME, _jpeg(photo, "CMYK")
          elif (c, i) == (1, 0):
            name, data = PNG_NAME, _jpeg(photo, fmt="PNG")
          elif (c, i) == (2, 1):
            data = _jpeg(photo, "L")
          _add(class_tar, name, data)
      _add(train, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
    for i in range(6):
      _add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(photos[i % 4], "L" if i == 2 else "RGB"))
  data_dir = str(root / "tfds")
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return data_dir


def _config(data_dir, total_steps=2):
  config = imagenet.get_config("volo_d1_224")
  config.data.data_dir = data_dir
  config.model.name = "volo_tiny"
  config.model.img_size = 64
  config.batch_size = 8
  config.total_steps = total_steps
  config.log_every_steps = 1
  config.data.shuffle_buffer = 64
  config.mesh.fsdp = 2  # 4 × 2 on the 8 test devices
  config.token_label.enabled = False  # tests/test_token_labels.py reads them
  return config


def test_tfds_built_the_fake_archives(imagenet_dir):
  info = pipeline.dataset_info(_config(imagenet_dir))
  assert (info.num_classes, info.num_train, info.num_eval) == (1000, 12, 6)


def test_train_batches_are_deterministic_and_resume_mid_stream(imagenet_dir):
  config = _config(imagenet_dir)
  kwargs = dict(local_batch=4, process_index=0, process_count=1)
  stream = pipeline.train_dataset(config, start_step=0, **kwargs)
  first = [next(stream) for _ in range(3)]
  again = next(pipeline.train_dataset(config, start_step=0, **kwargs))
  resumed = next(pipeline.train_dataset(config, start_step=2, **kwargs))
  np.testing.assert_array_equal(first[0]["image"], again["image"])
  np.testing.assert_array_equal(first[2]["image"], resumed["image"])
  np.testing.assert_array_equal(first[2]["label"], resumed["label"])
  batch = first[0]
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert set(np.concatenate([b["label"] for b in first])) <= {0, 59, 230}  # the wnids' ImageNet indices
  assert -2.2 < batch["image"].mean() < 2.7


def test_eval_covers_every_image_once_over_processes(imagenet_dir):
  config = _config(imagenet_dir)
  seen = []
  for process in range(4):
    batches, num_batches = pipeline.eval_dataset(config, local_batch=2, process_index=process, process_count=4)
    batches = list(batches)
    assert len(batches) == num_batches
    seen += [float(m) for b in batches for m in b["mask"]]
  assert sum(seen) == 6 and len(seen) == 8  # 6 images + 2 padding slots

