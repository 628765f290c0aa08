"""Using what was trained: `predict --weights WORKDIR` with the dataset's class names, and
`convert export --format timm`, which timm's `create_model("local-dir:...", pretrained=True)` loads strictly with
the same logits; bad input is one line and exit 2 with nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import volo_jax
from configs import digits
from volo_jax import export, predict
from volo_jax.convert import __main__ as convert_cli
from volo_jax.convert.flax_io import save_model_checkpoint
from volo_jax.data import digits_folder, folder
from volo_jax.train import loop


@pytest.fixture(scope="module")
def folder_workdir(tmp_path_factory):
  """Two steps of training on a 3-class PNG/JPEG digits folder: a workdir whose config names the dataset."""
  tmp = tmp_path_factory.mktemp("folder_run")
  images = str(tmp / "digits")
  digits_folder.write_digits_folder(images, classes=3)
  folder.write_dataset(images, "three_digits", str(tmp / "data"), log=lambda _: None)
  config = digits.get_config()
  config.data.dataset, config.data.data_dir, config.data.eval_split = "three_digits", str(tmp / "data"), "validation"
  config.batch_size, config.total_steps, config.eval_every_epochs = 32, 2, 100
  workdir = str(tmp / "workdir")
  loop.train_and_evaluate(config, workdir)
  return workdir, images


def test_predict_reads_a_training_workdir_with_its_class_names(folder_workdir, capsys):
  workdir, images = folder_workdir
  paths = [os.path.join(images, "two", sorted(os.listdir(os.path.join(images, "two")))[0])]
  assert predict.main(["--weights", workdir, "--top", "3", *paths]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == paths[0] and len(lines) == 4
  assert sorted(line.split()[-1] for line in lines[1:]) == ["one", "two", "zero"]


def test_convert_export_timm_loads_strictly_in_timm_with_the_same_logits(tmp_path):
  model = volo_jax.create_model("volo_d1", img_size=224, num_classes=7, seed=2)
  save_model_checkpoint(model, str(tmp_path / "converted"), model_name="volo_d1", img_size=224)
  out = str(tmp_path / "timm_dir")
  assert convert_cli.main(["export", str(tmp_path / "converted"), out, "--format", "timm"]) == 0
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert config["architecture"] == "volo_d1_224" and config["num_classes"] == 7
  assert config["pretrained_cfg"]["crop_pct"] == 0.96 and config["pretrained_cfg"]["input_size"] == [3, 224, 224]
  x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  model.eval()
  expected = np.asarray(model(x))
  np.save(str(tmp_path / "x.npy"), x)
  script = ("import sys, numpy as np, torch, timm\n"
            "m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()\n"  # strict by default
            "assert m.pretrained_cfg['num_classes'] == 7, m.pretrained_cfg\n"
            "x = torch.from_numpy(np.load(sys.argv[2]).transpose(0, 3, 1, 2))\n"
            "with torch.no_grad(): np.save(sys.argv[3], m(x).numpy())\n")
  run = subprocess.run([sys.executable, "-c", script, out, str(tmp_path / "x.npy"), str(tmp_path / "t.npy")],
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  reference = np.load(str(tmp_path / "t.npy"))
  assert reference.shape == (2, 7)
  assert np.abs(reference - expected).max() <= 1e-5 * np.abs(reference).max() + 1e-5


def test_export_bad_input_is_one_line_exit_2_and_writes_nothing(folder_workdir, tmp_path, capsys):
  workdir, _ = folder_workdir
  os.makedirs(tmp_path / "taken")
  cases = [([workdir, str(tmp_path / "out")], "timm has no volo_tiny"),
           ([str(tmp_path / "missing"), str(tmp_path / "out")], "no such file or directory"),
           ([str(tmp_path), str(tmp_path / "taken")], "neither a training workdir")]
  for args, words in cases:
    assert convert_cli.main(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
  assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_jax_export_runs_without_volo_jax_at_batch_1_and_3(tmp_path, capsys):
  model = volo_jax.create_model("volo_tiny", img_size=32, num_classes=5, seed=5)
  save_model_checkpoint(model, str(tmp_path / "converted"), model_name="volo_tiny", img_size=32)
  out = str(tmp_path / "volo.jaxexport")
  assert export.main([str(tmp_path / "converted"), out, "--platforms", "cpu,cuda,tpu"]) == 0
  with open(out + ".json") as f:
    assert json.load(f)["img_size"] == 32
  x = np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32)
  model.eval()
  expected = np.asarray(model(x))
  np.save(str(tmp_path / "x.npy"), x)
  script = ("import sys, numpy as np, jax\n"
            "exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
            "x = np.load(sys.argv[2])\n"
            "np.save(sys.argv[3], np.concatenate([exported.call(x[:1]), exported.call(x)]))\n"
            "assert not [m for m in sys.modules if m.startswith('volo_jax')]\n")
  run = subprocess.run([sys.executable, "-c", script, out, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                       capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert run.returncode == 0, run.stderr[-2000:]
  logits = np.load(str(tmp_path / "y.npy"))
  np.testing.assert_allclose(logits[:1], expected[:1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[1:], expected, rtol=1e-5, atol=1e-5)
  capsys.readouterr()
  assert export.main([str(tmp_path / "converted"), out]) == 2  # exists
  assert export.main([str(tmp_path / "converted"), str(tmp_path / "b.jaxexport"), "--platforms", "gpu"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "already exists" in err[0] and "--platforms gpu" in err[1]
  assert not os.path.exists(tmp_path / "b.jaxexport")
