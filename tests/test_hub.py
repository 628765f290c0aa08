"""Weights by Hub name, offline: a real Hugging Face cache layout built from exported random weights; our models
equal the source, timm's `create_model(..., pretrained=True)` on the same cache gives the same logits, and a
name that is not cached (or unknown) is one clear error."""

import json
import os
import subprocess
import sys

from huggingface_hub import constants
import numpy as np
import pytest
import tensorflow as tf

import volo_jax
from volo_jax import hub
from volo_jax.errors import CheckpointError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache: str, repo: str, model, model_name: str, *, img_size: int, crop_pct: float,
                 weights_name: str = "model.safetensors") -> None:
  """The layout huggingface_hub writes: models--<owner>--<name>/refs/main and snapshots/<sha>/<files>."""
  snapshot = os.path.join(cache, "models--" + repo.replace("/", "--"), "snapshots", SHA)
  os.makedirs(snapshot)
  os.makedirs(os.path.join(os.path.dirname(os.path.dirname(snapshot)), "refs"))
  with open(os.path.join(os.path.dirname(os.path.dirname(snapshot)), "refs", "main"), "w") as f:
    f.write(SHA)
  volo_jax.export_torch_weights(model, os.path.join(snapshot, weights_name))
  with open(os.path.join(snapshot, "config.json"), "w") as f:
    json.dump(hub.timm_config(model_name, img_size=img_size, num_classes=model.num_classes, crop_pct=crop_pct), f)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  cache = str(tmp_path / "hf_cache")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _logits(model, x):
  model.eval()
  return np.asarray(model(x))


def test_a_hub_repo_by_name_and_its_bin_fallback_give_the_source_logits(offline_cache):
  source = volo_jax.create_model("volo_tiny", img_size=32, num_classes=5, seed=3)
  add_to_cache(offline_cache, "someone/volo_tiny_digits", source, "volo_tiny", img_size=32, crop_pct=1.0)
  add_to_cache(offline_cache, "someone/volo_tiny_bin", source, "volo_tiny", img_size=32, crop_pct=1.0,
               weights_name="pytorch_model.bin")
  x = _images(2, 32)
  expected = _logits(source, x)
  for name in ("hf-hub:someone/volo_tiny_digits", "hf-hub:someone/volo_tiny_bin"):
    model = volo_jax.create_model(name, pretrained=True)
    assert model.num_classes == 5 and model.pos_embed.shape[1:3] == (2, 2)
    np.testing.assert_array_equal(_logits(model, x), expected)
  fresh = volo_jax.create_model("volo_tiny", img_size=32, num_classes=5, seed=4)
  volo_jax.load_pretrained(fresh, "hf-hub:someone/volo_tiny_digits")
  np.testing.assert_array_equal(_logits(fresh, x), expected)
  assert hub.model_spec(hub.hub_config("hf-hub:someone/volo_tiny_digits")) == ("volo_tiny", 32, 5, 1.0)


def test_a_name_not_cached_offline_or_unknown_is_one_clear_error(offline_cache):
  model = volo_jax.create_model("volo_tiny", img_size=32)
  with pytest.raises(CheckpointError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
    volo_jax.load_pretrained(model, "hf-hub:timm/volo_d1_384.sail_in1k")
  with pytest.raises(CheckpointError, match="unknown pretrained model 'volo_d9_224.sail_in1k'"):
    volo_jax.create_model("volo_d9_224.sail_in1k", pretrained=True)
  with pytest.raises(CheckpointError, match="no released weights"):
    volo_jax.create_model("volo_tiny", pretrained=True)
  assert hub.model_spec(hub.hub_config("volo_d4_448.sail_in1k")) == ("volo_d4", 448, 1000, 1.15)  # the table's


def test_a_config_asking_for_another_eval_transform_is_refused():
  config = hub.timm_config("volo_d1", img_size=224, num_classes=10, crop_pct=0.9)
  assert hub.model_spec(config) == ("volo_d1", 224, 10, 0.9)
  for key, value in (("mean", [0.5, 0.5, 0.5]), ("std", [0.5, 0.5, 0.5]), ("interpolation", "bilinear")):
    other = json.loads(json.dumps(config))
    other["pretrained_cfg"][key] = value
    with pytest.raises(CheckpointError, match=f"pretrained_cfg {key} .* the only"):
      hub.model_spec(other)


@pytest.mark.slow
def test_released_name_offline_equals_the_source_and_timms_create_model(offline_cache):
  source = volo_jax.create_model("volo_d1", img_size=224, seed=1)
  add_to_cache(offline_cache, "timm/volo_d1_224.sail_in1k", source, "volo_d1", img_size=224, crop_pct=0.96)
  x = _images(1, 224)
  expected = _logits(source, x)
  model = volo_jax.create_model("volo_d1_224.sail_in1k", pretrained=True)
  np.testing.assert_array_equal(_logits(model, x), expected)
  np.save(os.path.join(offline_cache, "x.npy"), x)
  script = ("import sys, numpy as np, torch, timm\n"
            "m = timm.create_model('volo_d1_224.sail_in1k', pretrained=True).eval()\n"
            "x = torch.from_numpy(np.load(sys.argv[1]).transpose(0, 3, 1, 2))\n"
            "with torch.no_grad(): np.save(sys.argv[2], m(x).numpy())\n")
  env = dict(os.environ, HF_HUB_CACHE=offline_cache, HF_HUB_OFFLINE="1")
  out = os.path.join(offline_cache, "timm.npy")
  run = subprocess.run([sys.executable, "-c", script, os.path.join(offline_cache, "x.npy"), out], env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  reference = np.load(out)
  assert np.abs(reference - expected).max() <= 1e-5 * np.abs(reference).max() + 1e-5


@pytest.mark.slow
def test_predict_with_a_hub_name_not_cached_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty_cache"), HF_HUB_OFFLINE="1")
  image = str(tmp_path / "cat.png")
  with open(image, "wb") as f:
    f.write(tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy())
  run = subprocess.run([sys.executable, "-m", "volo_jax.predict", "--model", "volo_d2_224.sail_in1k", image],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: hf-hub:timm/volo_d2_224.sail_in1k") and "HF_HUB_OFFLINE" in last, run.stderr


def test_predict_by_hub_name_uses_the_repos_config_and_class_names(offline_cache, tmp_path, capsys):
  from volo_jax import predict  # pylint: disable=import-outside-toplevel
  source = volo_jax.create_model("volo_tiny", img_size=32, num_classes=3, seed=6)
  add_to_cache(offline_cache, "someone/volo_tiny_abc", source, "volo_tiny", img_size=32, crop_pct=1.0)
  config_file = os.path.join(offline_cache, "models--someone--volo_tiny_abc", "snapshots", SHA, "config.json")
  with open(config_file) as f:
    config = json.load(f)
  with open(config_file, "w") as f:
    json.dump(dict(config, label_names=["ant", "bee", "cat"]), f)
  image = str(tmp_path / "x.png")
  with open(image, "wb") as f:
    f.write(tf.io.encode_png(np.full((40, 40, 3), 128, np.uint8)).numpy())
  assert predict.main(["--model", "hf-hub:someone/volo_tiny_abc", "--top", "3", image]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == image and sorted(line.split()[-1] for line in lines[1:]) == ["ant", "bee", "cat"]
