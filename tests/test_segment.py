"""`python -m volo_jax.segment` in-process on the digits config with weights the test writes: palette masks at each
image's size, overlays, the class table, the mask against the model's own argmax, and one-line bad input."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from volo_jax import segment
from volo_jax.convert import segmenter as convert
from volo_jax.data import segmentation_datasets
from volo_jax.data.transforms import normalize
from volo_jax.models.upernet import resize_bilinear

CONFIG = "configs/segmentation.py:digits"
SQUARE, WIDE = (64, 64), (48, 80)  # (H, W): the canvas itself, and one resized to 38 × 64 on it


@pytest.fixture(scope="module")
def digits():
  """(config, its source, a segmenter with randomised weights, those weights by PyTorch name)."""
  from configs import segmentation  # pylint: disable=import-outside-toplevel
  from volo_jax.train import loop  # pylint: disable=import-outside-toplevel
  config = segmentation.get_config("digits")
  source = segmentation_datasets.source(config.data.dataset)
  model = loop.build_model(config, source.num_classes)
  rng = np.random.default_rng(0)
  tensors = {}
  for key, value in convert.state_dict(model).items():  # random enough that several classes win somewhere
    if key.endswith("running_var"):
      tensors[key] = (0.5 + rng.random(value.shape)).astype(np.float32)
    elif key.endswith("num_batches_tracked"):
      tensors[key] = value
    else:
      tensors[key] = (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
  convert.load_state_dict(model, tensors)
  model.eval()
  return config, source, model, tensors


@pytest.fixture(scope="module")
def weights_file(digits, tmp_path_factory):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp("weights") / "segmenter.safetensors"
  save_file(digits[3], str(path))
  return str(path)


def _photo(size, seed):
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_masks_overlays_and_table(digits, weights_file, tmp_path, capsys):
  _, source, model, _ = digits
  square, wide = _photo(SQUARE, 1), _photo(WIDE, 2)
  Image.fromarray(square).save(tmp_path / "square.png")
  Image.fromarray(wide).save(tmp_path / "wide.png")
  out = tmp_path / "out"
  assert segment.main(["--config", CONFIG, "--weights", weights_file, "--out", str(out),
                       str(tmp_path / "square.png"), str(tmp_path / "wide.png")]) == 0
  table = capsys.readouterr().out
  k = source.num_classes
  masks = {}
  for stem, image in (("square", square), ("wide", wide)):
    mask_image = Image.open(out / f"{stem}.png")
    assert mask_image.mode == "P" and mask_image.size == (image.shape[1], image.shape[0])
    palette = np.asarray(mask_image.getpalette()[:3 * k], np.uint8).reshape(k, 3)
    np.testing.assert_array_equal(palette, source.palette)
    mask = np.asarray(mask_image)
    assert set(np.unique(mask)) <= set(range(k)) | {255}
    masks[stem] = mask
    with Image.open(out / f"{stem}_overlay.jpg") as overlay:
      assert overlay.size == mask_image.size
  for mask in masks.values():
    for cls in np.unique(mask):
      assert f"  {cls:4d}  {source.class_names[cls]}" in table
  assert len(np.unique(masks["square"])) > 1  # the weights make a mask worth checking

  # The reference: the canvas-sized image needs no resize; one window (stride 64) covers it.
  x = normalize(tf.constant(square)).numpy()[None]
  reference = np.argmax(np.asarray(resize_bilinear(model(x), SQUARE))[0], axis=-1)
  np.testing.assert_array_equal(masks["square"], reference)


def test_one_image_to_a_png_path(weights_file, tmp_path):
  Image.fromarray(_photo(WIDE, 3)).save(tmp_path / "in.jpg")
  mask_path = tmp_path / "masks" / "mine.png"
  assert segment.main(["--config", CONFIG, "--weights", weights_file, "--out", str(mask_path),
                       str(tmp_path / "in.jpg")]) == 0
  assert Image.open(mask_path).size == (WIDE[1], WIDE[0])
  assert (tmp_path / "masks" / "mine_overlay.jpg").is_file()


@pytest.mark.parametrize("case", ["missing image", "not an image", "unknown config", "classifier weights"])
def test_bad_input_is_one_line_and_exit_2(case, weights_file, tmp_path, capsys):
  image = tmp_path / "in.png"
  Image.fromarray(_photo(SQUARE, 4)).save(image)
  config, weights, path = CONFIG, weights_file, str(image)
  if case == "missing image":
    path = str(tmp_path / "nope.png")
  elif case == "not an image":
    (tmp_path / "text.png").write_text("hello")
    path = str(tmp_path / "text.png")
  elif case == "unknown config":
    config = "configs/segmentation.py:ade20k_volo_d9"
  else:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    from volo_jax.convert import mapping  # pylint: disable=import-outside-toplevel
    from volo_jax.models import create_model  # pylint: disable=import-outside-toplevel
    weights = str(tmp_path / "classifier.safetensors")
    save_file(mapping.state_dict(create_model("volo_tiny", img_size=64, num_classes=11)), weights)
  argv = ["--config", config, "--weights", weights, "--out", str(tmp_path / "out"), path]
  with pytest.raises(SystemExit) as exit_info:
    raise SystemExit(segment.main(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("python -m volo_jax.segment: error: ") and "\n" not in err, err
  assert not (tmp_path / "out").exists()
