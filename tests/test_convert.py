"""Weight conversion both ways against timm, the official fine-tuning load changes, and refusal of bad files."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import (nhwc_batch, randomised_timm_volo, relative_error, save_official_checkpoint, torch,
                             torch_logits)
import volo_jax
from volo_jax.convert import __main__ as convert_cli
from volo_jax.convert.mapping import bicubic_matrix, resize_pos_embed, state_dict
from volo_jax.convert.torch_io import CheckpointError

F = torch.nn.functional


@pytest.fixture(scope="module")
def d1_reference():
  return randomised_timm_volo("volo_d1", seed=10)


@pytest.fixture(scope="module")
def d1_checkpoint(d1_reference, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "d1_224.pth.tar")
  save_official_checkpoint(d1_reference, path, ema_model=randomised_timm_volo("volo_d1", seed=11))
  return path


def _eval_logits(model, images):
  model.eval()
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))


def _weights(model):
  return {k: np.asarray(v) for k, v in state_dict(model).items()}


def test_official_checkpoint_loads_exactly(d1_reference, d1_checkpoint):
  model = volo_jax.create_model("volo_d1")
  report = volo_jax.load_torch_weights(model, d1_checkpoint)
  assert len(report.loaded) == 257 and not report.left_at_init
  assert all(name.endswith("num_batches_tracked") for name in report.ignored)
  images = nhwc_batch(2, 224, seed=1)
  assert relative_error(_eval_logits(model, images), torch_logits(d1_reference, images)) <= 1e-4


def test_ema_weights_are_taken_when_asked(d1_checkpoint):
  ema = randomised_timm_volo("volo_d1", seed=11)
  model = volo_jax.create_model("volo_d1")
  volo_jax.load_torch_weights(model, d1_checkpoint, use_ema=True)
  for name, value in _weights(model).items():
    np.testing.assert_array_equal(value, ema.state_dict()[name].numpy() if "num_batches" not in name else 0)


def test_module_prefix_and_bare_state_dict(d1_reference, tmp_path):
  prefixed = str(tmp_path / "ddp.pth.tar")
  save_official_checkpoint(d1_reference, prefixed, module_prefix=True)
  bare = str(tmp_path / "bare.pth")
  torch.save(d1_reference.state_dict(), bare)
  expected = {k: v.numpy() for k, v in d1_reference.state_dict().items()}
  for path in (prefixed, bare):
    model = volo_jax.create_model("volo_d1")
    volo_jax.load_torch_weights(model, path)
    for name, value in _weights(model).items():
      if "num_batches" not in name:
        np.testing.assert_array_equal(value, expected[name])


@pytest.mark.parametrize("in_size,out_size", [(14, 24), (14, 28), (14, 32), (24, 14), (5, 9)])
def test_bicubic_matches_pytorch_interpolate(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((1, in_size, in_size + 1, 7)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(out_size, out_size + 2), mode="bicubic",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  assert relative_error(resize_pos_embed(x, out_size, out_size + 2), ref) < 2e-6  # float32 round-off
  assert bicubic_matrix(in_size, out_size).sum(axis=1) == pytest.approx(np.ones(out_size))


def test_224_checkpoint_fine_tunes_at_384_like_the_official_loader(d1_reference, d1_checkpoint):
  """Official load_pretrained_weights: pos_embed resized with F.interpolate(bicubic), then a strict load."""
  reference_384 = randomised_timm_volo("volo_d1", img_size=384)
  weights = dict(d1_reference.state_dict())
  pos = weights["pos_embed"].permute(0, 3, 1, 2)
  weights["pos_embed"] = F.interpolate(pos, size=(24, 24), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
  reference_384.load_state_dict(weights, strict=True)
  model = volo_jax.create_model("volo_d1", img_size=384)
  report = volo_jax.load_torch_weights(model, d1_checkpoint)
  assert report.resized == ["pos_embed (1, 14, 14, 384) -> (1, 24, 24, 384)"]
  images = nhwc_batch(1, 384, seed=2)
  error = relative_error(_eval_logits(model, images), torch_logits(reference_384.eval(), images))
  print(f"224→384 fine-tune load: max|Δ|/max|logit| = {error:.2e}")
  assert error <= 1e-4


def test_new_class_count_leaves_heads_at_init(d1_reference, d1_checkpoint):
  model = volo_jax.create_model("volo_d1", num_classes=10, seed=3)
  initial_head = np.asarray(model.head.kernel[...])
  report = volo_jax.load_torch_weights(model, d1_checkpoint)
  assert sorted(report.left_at_init) == ["aux_head.bias", "aux_head.weight", "head.bias", "head.weight"]
  assert {"head.weight", "aux_head.bias"} <= set(report.ignored)
  np.testing.assert_array_equal(model.head.kernel[...], initial_head)
  np.testing.assert_array_equal(model.norm.scale[...], d1_reference.norm.weight.detach().numpy())


def test_export_loads_strictly_into_timm_and_reproduces_logits(tmp_path):
  model = volo_jax.create_model("volo_d1", seed=4)
  images = nhwc_batch(2, 224, seed=5)
  expected = np.asarray(_eval_logits(model, images))
  for suffix in (".pth", ".safetensors"):
    path = str(tmp_path / f"exported{suffix}")
    volo_jax.export_torch_weights(model, path)
    reference = randomised_timm_volo("volo_d1", seed=6)
    if suffix == ".pth":
      weights = torch.load(path, weights_only=True)
    else:
      from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
      weights = load_file(path)
    reference.load_state_dict(weights, strict=True)
    assert relative_error(expected, torch_logits(reference.eval(), images)) <= 1e-4


def test_flax_torch_flax_round_trip_is_exact(tmp_path):
  model = volo_jax.create_model("volo_d2", seed=7)
  path = str(tmp_path / "d2.safetensors")
  volo_jax.export_torch_weights(model, path)
  again = volo_jax.create_model("volo_d2", seed=8)
  volo_jax.load_torch_weights(again, path)
  before, after = _weights(model), _weights(again)
  assert before.keys() == after.keys()
  for name in before:
    np.testing.assert_array_equal(before[name], after[name])


class _WritesAFile:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (self.target, "w"))


def test_pickle_with_code_payload_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pth.tar")
  torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _WritesAFile(str(marker))}, path)
  with pytest.raises(CheckpointError, match="refused or unreadable"):
    volo_jax.load_torch_weights(volo_jax.create_model("volo_d1"), path)
  assert not marker.exists()


def test_wrong_variant_names_the_tensor_and_shapes(d1_checkpoint):
  with pytest.raises(CheckpointError, match=r"wrong variant.*cls_token checkpoint \(1, 1, 384\) "
                                            r"vs model \(1, 1, 512\).*\(\+2\d\d more\)"):
    volo_jax.load_torch_weights(volo_jax.create_model("volo_d2"), d1_checkpoint)


def test_missing_ema_and_non_checkpoints_are_clear_errors(d1_reference, tmp_path):
  plain = str(tmp_path / "plain.pth")
  torch.save(d1_reference.state_dict(), plain)
  with pytest.raises(CheckpointError, match="no 'state_dict_ema'"):
    volo_jax.load_torch_weights(volo_jax.create_model("volo_d1"), plain, use_ema=True)
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
    volo_jax.load_torch_weights(volo_jax.create_model("volo_d1"), str(text))
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(open(plain, "rb").read()[: os.path.getsize(plain) // 2])
  with pytest.raises(CheckpointError):
    volo_jax.load_torch_weights(volo_jax.create_model("volo_d1"), str(truncated))


def test_cli_round_trip_and_predict(d1_reference, d1_checkpoint, tmp_path):
  """As a user runs it: torch2flax → flax2torch → strict timm load; predict on a real JPEG."""
  out_dir, exported = tmp_path / "flax_d1", tmp_path / "back.pth"
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
  result = run("volo_jax.convert", "torch2flax", d1_checkpoint, str(out_dir), "--model", "volo_d1")
  assert result.returncode == 0, result.stderr
  result = run("volo_jax.convert", "flax2torch", str(out_dir), str(exported), "--model", "volo_d1")
  assert result.returncode == 0, result.stderr
  back = torch.load(str(exported), weights_only=True)
  for name, value in d1_reference.state_dict().items():
    if "num_batches" not in name:
      np.testing.assert_array_equal(back[name].numpy(), value.numpy())
  # The converted directory is also what train.py's init_from / evaluate accept (here at another size).
  from volo_jax.train.checkpoint import load_pretrained  # pylint: disable=import-outside-toplevel
  model_384 = volo_jax.create_model("volo_d1", img_size=384)
  assert load_pretrained(model_384, str(out_dir)).resized == ["pos_embed (1, 14, 14, 384) -> (1, 24, 24, 384)"]
  np.testing.assert_array_equal(model_384.norm.scale[...], d1_reference.norm.weight.detach().numpy())

  from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  jpeg = str(tmp_path / "china.jpg")
  Image.fromarray(load_sample_image("china.jpg")).save(jpeg, quality=95)
  result = run("volo_jax.predict", "--model", "volo_d1", "--weights", str(out_dir), jpeg)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == jpeg and len(lines) == 6 and "%" in lines[1]


@pytest.mark.parametrize("args,message", [
    (["torch2flax", "{ckpt}", "{out}", "--model", "volo_d9"], "unknown model"),
    (["torch2flax", "{ckpt}", "{out}", "--model", "volo_d2"], "wrong variant"),
    (["torch2flax", "{missing}", "{out}", "--model", "volo_d1"], "no such file"),
    (["torch2flax", "{ckpt}", "{out}", "--model", "volo_d1", "--img-size", "200"], "multiple of"),
    (["flax2torch", "{out}", "{ckpt}.pth", "--model", "volo_d1"], "not a volo_jax weights checkpoint"),
])
def test_cli_errors_are_one_line_with_nonzero_exit(args, message, d1_checkpoint, tmp_path, capsys):
  fill = dict(ckpt=d1_checkpoint, out=str(tmp_path / "out"), missing=str(tmp_path / "nope.pth"))
  assert convert_cli.main([a.format(**fill) for a in args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err
  assert not (tmp_path / "out").exists()
