"""scan_blocks (stacked, scanned blocks) and remat against the per-layer model and timm: logits, weight
conversion both ways, loss and gradients, the compiled loops, and a sharded train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from torch_reference import (converted_volo, nhwc_batch, randomised_timm_volo, relative_error,
                             save_official_checkpoint, torch, torch_logits)
from configs import digits
import volo_jax
from volo_jax.convert import __main__ as convert_cli
from volo_jax.convert.flax_io import read_model_json, restore_weights
from volo_jax.convert.mapping import load_state_dict, state_dict
from volo_jax.convert.torch_io import CheckpointError
from volo_jax.models.stack import BlockStack
from volo_jax.train import optim, sharding, step as step_lib
from volo_jax.train.loop import build_model

SIZE = 64  # stage 1 on 8×8 tokens, stages 2–4 on 4×4: small, but every op as at 224


def _forward(model, images):
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))


@pytest.mark.parametrize("name", ["volo_tiny"])  # d1's stacks are checked by the round trip below
def test_scanned_eval_logits_equal_per_layer_and_timm(name):
  reference = randomised_timm_volo(name, img_size=SIZE)
  images = nhwc_batch(2, SIZE, seed=1)
  scanned, per_layer = converted_volo(reference, name, scan_blocks=True), converted_volo(reference, name)
  assert [len(scanned.network[i]) for i in (0, 2)] == [len(reference.network[0]), sum(
      len(reference.network[i]) for i in (2, 3, 4))]
  scanned.eval()
  per_layer.eval()
  logits = _forward(scanned, images)
  np.testing.assert_allclose(logits, _forward(per_layer, images), rtol=0, atol=1e-6 * np.abs(logits).max())
  assert relative_error(logits, torch_logits(reference, images)) <= 1e-4


def test_scanned_train_forward_matches_timm():
  """Training forward with drop rates 0: BatchNorm on batch statistics, class and per-token logits."""
  reference = randomised_timm_volo("volo_tiny", img_size=SIZE).train()
  images = nhwc_batch(2, SIZE, seed=2)
  scanned = converted_volo(reference, "volo_tiny", scan_blocks=True)
  with torch.no_grad():
    cls_feat, ref_aux, _ = reference.forward_train(torch.from_numpy(images).permute(0, 3, 1, 2))
    ref_cls = reference.head(cls_feat).numpy()
  scanned.train()
  cls, aux, _ = nnx.jit(lambda m, x: m.forward_train(x))(scanned, jnp.asarray(images))
  assert relative_error(cls, ref_cls) <= 1e-4
  assert relative_error(aux, ref_aux.numpy()) <= 1e-4


def test_scanned_drop_path_schedule_matches_timm():
  reference = randomised_timm_volo("volo_tiny", img_size=32, drop_path_rate=0.3)
  model = nnx.eval_shape(lambda: volo_jax.create_model("volo_tiny", img_size=32, drop_path_rate=0.3,
                                                       scan_blocks=True))
  expected = [getattr(getattr(block, "drop_path1", None) or block.drop_path, "drop_prob", 0.0)
              for stage in (2, 3, 4) for block in reference.network[stage]]
  assert model.network[2].drop_path_rates == pytest.approx(expected)
  assert expected[-1] == pytest.approx(0.3) and model.network[0].drop_path_rates == (0.0, 0.0)


def test_torch_scanned_torch_round_trip_is_exact(tmp_path, capsys):
  """torch2flax --scan-blocks → flax2torch → timm strict load, bit for bit; either layout restores either."""
  reference = randomised_timm_volo("volo_d1", img_size=SIZE, seed=3)
  checkpoint = str(tmp_path / "d1.pth.tar")
  save_official_checkpoint(reference, checkpoint)
  out_dir, back = str(tmp_path / "flax_d1"), str(tmp_path / "back.pth")
  size = ["--model", "volo_d1", "--img-size", str(SIZE)]
  assert convert_cli.main(["torch2flax", checkpoint, out_dir, "--scan-blocks", *size]) == 0
  assert "loaded 257 tensors" in capsys.readouterr().out
  assert read_model_json(out_dir)["scan_blocks"] is True
  assert convert_cli.main(["flax2torch", out_dir, back, *size]) == 0
  exported = torch.load(back, weights_only=True)
  fresh = randomised_timm_volo("volo_d1", img_size=SIZE, seed=4)
  fresh.load_state_dict(exported, strict=True)
  for name, value in reference.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), value.numpy())
  per_layer = volo_jax.create_model("volo_d1", img_size=SIZE)
  restore_weights(per_layer, out_dir)  # stacked directory → per-layer model
  for name, value in state_dict(per_layer).items():
    np.testing.assert_array_equal(value, exported[name].numpy())


def test_a_wrong_layer_tensor_is_named_and_nothing_is_written():
  model = volo_jax.create_model("volo_tiny", img_size=32, scan_blocks=True)
  tensors = state_dict(model)
  before = np.asarray(model.network[2].blocks.mlp.fc1.kernel[...])
  tensors = {k: v + 1 if v.dtype == np.float32 else v for k, v in tensors.items()}
  tensors["network.3.0.mlp.fc1.weight"] = np.zeros((384, 64), np.float32)
  with pytest.raises(CheckpointError, match=r"^checkpoint does not fit.*: network\.3\.0\.mlp\.fc1\.weight "
                                            r"checkpoint \(384, 64\) vs model \(384, 128\)$"):
    load_state_dict(model, tensors)
  np.testing.assert_array_equal(model.network[2].blocks.mlp.fc1.kernel[...], before)


def _loss_and_grads(model, images, labels):
  """Train-mode loss and its gradients, keyed by PyTorch name so that both block layouts compare."""
  model.train()

  def loss_fn(m):
    return step_lib.cross_entropy(m(images), jax.nn.one_hot(labels, 10))

  loss, grads = nnx.jit(lambda m: nnx.value_and_grad(loss_fn)(m))(model)
  holder = nnx.clone(model)
  nnx.update(holder, grads)
  return float(loss), {k: v for k, v in state_dict(holder).items() if "running_" not in k and "num_b" not in k}


def test_remat_policies_give_the_same_loss_and_gradients():
  """Every remat policy, per layer and stacked, against the plain per-layer model (float32 round-off), whose
  loss is timm's."""
  reference = randomised_timm_volo("volo_tiny", img_size=32, num_classes=10, seed=5)
  images, labels = jnp.array(nhwc_batch(4, 32, seed=6)), jnp.arange(4)
  loss, grads = _loss_and_grads(converted_volo(reference, "volo_tiny"), images, labels)
  with torch.no_grad():
    cls_feat, _, _ = reference.train().forward_train(torch.from_numpy(nhwc_batch(4, 32, seed=6)).permute(0, 3, 1, 2))
    logits = reference.head(cls_feat)
  assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.arange(4))), rel=1e-5)
  for remat, scan in [("none", True), ("full", False), ("dots", False), ("dots_saveable", True)]:
    model = converted_volo(reference, "volo_tiny", scan_blocks=scan, remat=remat)
    remat_loss, remat_grads = _loss_and_grads(model, images, labels)
    assert remat_loss == pytest.approx(loss, rel=1e-6), (remat, scan)
    assert remat_grads.keys() == grads.keys()
    for name, g in grads.items():
      assert np.abs(remat_grads[name] - g).max() <= 1e-5 * (np.abs(g).max() + 1e-12), (remat, scan, name)


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match="none, full, dots, dots_saveable"):
    volo_jax.create_model("volo_tiny", img_size=32, remat="some")


def _count_whiles(model, images) -> int:
  model.eval()
  text = nnx.jit(lambda m, x: m(x)).lower(model, images).compile().as_text()
  return len(re.findall(r"\bwhile\(", text))


def test_one_compiled_loop_per_stack():
  images = jnp.zeros((1, 32, 32, 3))
  stacked = nnx.eval_shape(lambda: volo_jax.create_model("volo_tiny", img_size=32, scan_blocks=True))
  per_layer = nnx.eval_shape(lambda: volo_jax.create_model("volo_tiny", img_size=32))
  assert sum(isinstance(node, BlockStack) for _, node in nnx.iter_graph(stacked)) == 2
  assert _count_whiles(stacked, images) == 2
  assert _count_whiles(per_layer, images) == 0


def test_sharded_train_step_with_stacked_blocks():
  """One train step on a (data 4 × fsdp 2) mesh with stacked blocks, remat and drop path: per-layer RNG keys,
  fsdp never on the layer axis, and the same step twice draws the same masks."""
  config = digits.get_config()
  config.model.scan_blocks, config.model.remat, config.model.drop_path_rate = True, "full", 0.1
  config.mesh.fsdp = 2
  mesh = sharding.make_mesh(config)
  graphdef, params, batch_stats, rng_template = nnx.split(build_model(config, 10), nnx.Param, nnx.BatchStat, ...)
  keys = nnx.to_flat_state(step_lib.fresh_rng_state(rng_template, jax.random.key(0)))
  assert {v.get_value().shape for p, v in keys if "blocks" in p} == {(4,)}
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = step_lib.initial_state(params, batch_stats, tx)
  shardings = sharding.state_shardings(state, mesh)
  assert shardings["params"]["network"][2]["blocks"]["mlp"]["fc1"]["kernel"].spec == P(None, None, "fsdp")
  assert sharding.state_shardings({"blocks": jnp.zeros((32, 3, 999))}, mesh)["blocks"].spec == P()
  batch = jax.device_put({"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)), "label": jnp.arange(8)},
                         sharding.batch_sharding(mesh))
  train_step = jax.jit(step_lib.make_train_step(graphdef, rng_template, tx, config, 10),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None))
  state = jax.device_put(state, shardings)
  new, metrics = train_step(state, batch)
  again, _ = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and int(new["step"]) == 1
  for x, y in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(again["params"])):
    np.testing.assert_array_equal(x, y)
