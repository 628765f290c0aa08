"""`python -m volo_jax.bench`: the JSON every case writes, and XLA's FLOP count against the paper's."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from torch_reference import torch  # noqa: F401  (torch before TensorFlow)
from volo_jax import bench
from volo_jax.cpu import host_memory, xla as xla_cpu
from volo_jax.models import create_model

_STATS = {"median", "min", "max"}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _check_case(case: dict, input_images: int):
  for key in ("mode", "framework", "model", "img_size", "batch", "dtype", "scan", "remat", "paper_flops_per_image"):
    assert key in case, key
  assert set(case["images_per_s"]) == _STATS and set(case["step_time_s"]) == _STATS
  ips, step = case["images_per_s"], case["step_time_s"]
  assert 0 < ips["min"] <= ips["median"] <= ips["max"]
  # the input cases read each JPEG 4 times, in whole batches
  images = case["batch"] if case["mode"] != "input" else max(1, 4 * input_images // case["batch"]) * case["batch"]
  assert ips["median"] == pytest.approx(images / step["median"], rel=1e-9)
  assert ips["min"] == pytest.approx(images / step["max"], rel=1e-9)
  if case["mode"] != "input":  # process CPU seconds per timed run, and the host cores they kept busy
    assert set(case["cpu_time_s"]) == _STATS and 0 < case["cpu_time_s"]["min"] <= case["cpu_time_s"]["max"]
    assert case["host_cores_busy"] == pytest.approx(case["cpu_time_s"]["median"] / step["median"])
  if case["framework"] in ("jax", "jax_plain") and case["mode"] != "input":
    assert case["compile_time_s"] > 0 and case["flops_per_image"] > 0 and case["compiled_buffer_bytes"] > 0
    assert case["flops_source"] == "xla"
    assert case["flops_per_s"] == pytest.approx(case["flops_per_image"] * ips["median"])
    assert 0 < case["mfu"] < 2
    assert "peak_memory_bytes" in case
    if "speedup_vs_torch_eager" in case:  # the ratio column of the table
      assert case["speedup_vs_torch_eager"] > 0


_AFTER_A_GLOBAL_MESH = """
import runpy, jax
jax.set_mesh(jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2))
runpy.run_module("volo_jax.bench", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_bench_writes_every_case_to_json(tmp_path):
  """The user's command in its own process (the bench sets process-wide state: malloc, dispatch, PyTorch's
  threads; run inside a pytest worker after other modules it twice died of a SIGABRT there), started after the
  calling program set a (data, fsdp) mesh globally, as a trainer does: the bench must build on its own mesh.
  With --plain, the plain model in a plain jax.jit is timed too, with its ratio to timm."""
  out = tmp_path / "bench.json"
  command = [sys.executable, "-c", _AFTER_A_GLOBAL_MESH, "--model", "volo_d1", "--img-size", "32", "--batch", "8",
             "--mode", "infer,train,input", "--compare-torch", "--no-torch-compile", "--runs", "1", "--warmup", "0",
             "--input-images", "4", "--outlook-breakdown", "--plain", "--json", str(out)]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "img/s med" in done.stdout and "matmul peak" in done.stdout  # the table
  rows = [line.split()[:2] for line in done.stdout.splitlines()]
  assert ["infer", "jax_plain"] in rows and ["train", "jax_plain"] in rows
  results = json.loads(out.read_text())
  assert results["machine"]["backend"] == jax.default_backend()
  assert results["machine"]["host_memory_retained"] == (sys.platform.startswith("linux")
                                                        and not host_memory.accelerator_attached())
  assert results["machine"]["torch_threads"] == os.cpu_count()  # the model cases' count, after the one-core input case
  assert results["machine"]["xla_compiler_options"] == xla_cpu.compiler_options("auto")
  assert isinstance(results["machine"]["cpu_model"], str)
  assert results["matmul_peak"]["flops_per_s"] > 0
  cases = {(c["mode"], c["framework"]): c for c in results["cases"]}
  assert set(cases) == {("infer", "jax"), ("infer", "jax_plain"), ("infer", "torch_eager"), ("train", "jax"),
                        ("train", "jax_plain"), ("train", "torch_eager"), ("input", "jax_tf_data"),
                        ("input", "torch_pil")}
  for case in cases.values():
    _check_case(case, input_images=4)
  ours, theirs = cases[("input", "jax_tf_data")], cases[("input", "torch_pil")]
  assert ours["tf_intra_op_threads"] in (0, 1)  # 1 unless TensorFlow had started before the bench
  for case in (ours, theirs):
    assert set(case["cpu_time_s"]) == _STATS and case["images_per_cpu_s"] == pytest.approx(
        16 / case["cpu_time_s"]["median"])
  assert ours["speedup_vs_torch_pil_per_cpu_s"] == pytest.approx(
      ours["images_per_cpu_s"] / theirs["images_per_cpu_s"])
  for mode in ("infer", "train"):
    torch_case = cases[(mode, "torch_eager")]
    for framework in ("jax", "jax_plain"):
      jax_case = cases[(mode, framework)]
      assert jax_case["speedup_vs_torch_eager"] == pytest.approx(
          jax_case["images_per_s"]["median"] / torch_case["images_per_s"]["median"])
    # the same XLA FLOP count within float round-off of the counts: the same model, other kernels
    assert cases[(mode, "jax_plain")]["flops_per_image"] == pytest.approx(cases[(mode, "jax")]["flops_per_image"],
                                                                          rel=0.05)
  # The cases ran data parallel over the test process's 8 CPU devices: their FLOPs count all devices' shares, as one
  # device running the whole batch would (XLA's cost analysis counts one device's program).
  abstract = nnx.eval_shape(lambda: create_model("volo_d1", img_size=32, num_classes=1000))
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  one_device = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile().cost_analysis()
  assert jax.device_count() == 8 and results["matmul_peak"]["devices"] == 1  # CPU devices share the cores
  assert cases[("infer", "jax")]["flops_per_image"] == pytest.approx(one_device["flops"] / 8, rel=0.01)
  # A train step costs ≥ 3 forwards (backward ≈ 2 forwards, plus AdamW, large next to a 32-pixel forward).
  assert cases[("train", "jax")]["flops_per_image"] > 2.5 * cases[("infer", "jax")]["flops_per_image"]
  share = cases[("train", "jax")]["outlook_attention"]
  assert share["blocks"] == 4 and 0 < share["flops_share"] < 1 and share["time_share"] > 0


def test_scanned_model_takes_the_papers_flops():
  """XLA's cost analysis counts a scanned stack's loop body once, so with --scan the bench reports no XLA count
  and measures MFU against the paper's FLOPs."""
  def xla_flops(**kw):
    abstract = nnx.eval_shape(lambda: create_model("volo_d1", img_size=32, num_classes=1000, **kw))
    abstract.eval()
    graphdef, state = nnx.split(abstract)
    images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).cost_analysis()["flops"]
  assert xla_flops(scan_blocks=True) < 0.5 * xla_flops()  # d1's 18 blocks counted as 2 loop bodies

  small = bench.parse_args(["--model", "volo_d1", "--img-size", "32", "--scan"])
  mesh = jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    facts, _ = bench.jax_infer(small, mesh)
  assert facts["flops_per_call"] is None
  # the facts as the 224 model's, which the paper counts
  timed = dict(facts, framework="jax", images_per_s={"median": 2.0, "min": 1.0, "max": 3.0})
  case = bench._finish_case(timed, bench.parse_args(["--model", "volo_d1", "--scan"]), "infer",
                            {"flops_per_s": 1e11, "devices": 1})
  paper = 2e9 * bench.PAPER_GMACS[("volo_d1", 224)]
  assert case["flops_per_image"] is None and case["flops_source"] == "paper"
  assert case["paper_flops_per_image"] == paper and case["mfu"] == pytest.approx(2.0 * paper / 1e11)


def test_bench_refuses_unknown_mode():
  with pytest.raises(SystemExit):
    bench.parse_args(["--mode", "infer,fast"])


@pytest.mark.parametrize("name", ["volo_d1"])
def test_xla_flop_count_matches_the_paper(name):
  """The paper's FLOPs are multiply-adds: XLA's count of our eval forward at 224 is 2× that, within 7%
  (XLA also counts softmax, norms, GELU and the aux head)."""
  abstract = nnx.eval_shape(lambda: create_model(name, img_size=224))
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, images).compile()
  flops = compiled.cost_analysis()["flops"]
  assert flops == pytest.approx(2e9 * bench.PAPER_GMACS[(name, 224)], rel=0.07)


def test_jax_rows_run_the_trainers_cpu_path_and_plain_rows_the_public_model():
  """On a CPU backend the jax rows' model has the CPU kernels for --cpu-dots' library, as the trainer builds it; the
  jax_plain rows' model is create_model's as it is. --cpu-dots takes every choice of volo_jax.cpu.xla."""
  from volo_jax.cpu import kernels  # pylint: disable=import-outside-toplevel
  for dots in xla_cpu.CHOICES:
    args = bench.parse_args(["--model", "volo_tiny", "--img-size", "32", "--cpu-dots", dots, "--plain"])
    args.drop_path_rate = 0.0
    tuned, plain = bench._jax_model(args, train=False), bench._jax_model(args, train=False, plain=True)
    assert args.plain and tuned.network[2][0].attn.attention_core is (
        kernels.ATTENTION_CORES[xla_cpu.dot_library(dots)])
    assert plain.network[2][0].attn.attention_core is not tuned.network[2][0].attn.attention_core
    assert plain.head.dot_general is jax.lax.dot_general and tuned.head.dot_general is kernels.dot_general


@pytest.mark.slow
def test_segmentation_bench_rows_and_torch_check(tmp_path, capsys, monkeypatch):
  """--task segmentation in-process: the train step and slide inference of VOLO + UperNet against the PyTorch
  composite, whose infer logits the bench checks against ours before timing. Narrow heads keep it quick."""
  from volo_jax import bench_segmentation  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(bench_segmentation, "HEAD_CHANNELS", {"channels": 32, "aux_channels": 16})
  out = tmp_path / "bench.json"
  results = bench.main(["--task", "segmentation", "--model", "volo_tiny", "--crop", "64", "--batch", "8",
                        "--mode", "infer,train", "--compare-torch", "--no-torch-compile", "--runs", "1",
                        "--warmup", "0", "--default-malloc", "--json", str(out)])
  table = capsys.readouterr().out
  rows = [line.split()[:2] for line in table.splitlines()]
  for mode in ("infer", "train"):
    assert [mode, "jax"] in rows and [mode, "torch_eager"] in rows
  assert "2 windows of 64² each" in table
  assert json.loads(out.read_text())["cases"] == json.loads(json.dumps(results["cases"]))
  cases = {(c["mode"], c["framework"]): c for c in results["cases"]}
  for case in cases.values():
    assert case["task"] == "segmentation" and case["img_size"] == 64 and case["paper_flops_per_image"] is None
    _check_case(case, input_images=0)
  infer, train = cases[("infer", "jax")], cases[("train", "jax")]
  assert infer["image_size"] == [64, 85] and infer["windows"] == 2 and infer["relative_error_vs_torch"] <= 1e-4
  assert 0 < infer["speedup_vs_torch_eager"] < float("inf") and 0 < train["speedup_vs_torch_eager"] < float("inf")
  # a train step (forward of one crop, backward, AdamW) costs more than the forward of the image's two crops
  assert train["flops_per_image"] > infer["flops_per_image"] > 0


def test_segmentation_bench_refuses_input_mode_and_odd_crops():
  for argv in (["--mode", "input"], ["--crop", "100"]):
    with pytest.raises(SystemExit):
      bench.parse_args(["--task", "segmentation", *argv])
