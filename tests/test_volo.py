"""The VOLO family against timm's PyTorch VOLO (same state_dict as the official code) with random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import converted_volo, nhwc_batch, randomised_timm_volo, relative_error, torch, torch_logits
import volo_jax

PARAM_COUNTS = {"volo_d1": 26_632_040, "volo_d2": 58_678_336, "volo_d3": 86_325_072, "volo_d4": 192_961_520,
                "volo_d5": 295_455_584}


def _forward(model, images):
  return nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
  model = nnx.eval_shape(lambda: volo_jax.create_model(name))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", [
    "volo_d1", "volo_d2",
    pytest.param("volo_d3", marks=pytest.mark.slow),
    pytest.param("volo_d4", marks=pytest.mark.slow),
    pytest.param("volo_d5", marks=pytest.mark.slow),
])
def test_eval_logits_match_timm(name):
  size = 224 if name in ("volo_d1", "volo_d2") else 112  # d3–d5 differ in widths and depths, not in ops
  reference = randomised_timm_volo(name, img_size=size)
  images = nhwc_batch(2, size)
  model = converted_volo(reference, name)
  model.eval()
  error = relative_error(_forward(model, images), torch_logits(reference, images))
  print(f"{name} eval logits: max|Δ|/max|logit| = {error:.2e}")
  assert error <= 1e-4


def test_forward_train_matches_timm():
  """Training forward (BatchNorm on batch statistics, dropout/drop-path off): class and per-token logits."""
  reference = randomised_timm_volo("volo_d1").train()
  images = nhwc_batch(2, 224, seed=3)
  model = converted_volo(reference, "volo_d1")  # before PyTorch's forward updates its running stats
  with torch.no_grad():
    cls_feat, ref_aux, _ = reference.forward_train(torch.from_numpy(images).permute(0, 3, 1, 2))
    ref_cls = reference.head(cls_feat).numpy()
  model.train()
  cls, aux, box = nnx.jit(lambda m, x: m.forward_train(x))(model, jnp.asarray(images))
  assert relative_error(cls, ref_cls) <= 1e-4
  assert relative_error(aux, ref_aux.numpy()) <= 1e-4
  np.testing.assert_array_equal(box, [0, 0, 0, 0])
  # BatchNorm running statistics moved the way PyTorch moves them (momentum 0.1).
  for ours, theirs in ((model.patch_embed.norms[0].mean, reference.patch_embed.conv[1].running_mean),
                       (model.patch_embed.norms[2].var, reference.patch_embed.conv[7].running_var)):
    assert relative_error(ours[...], theirs.numpy()) <= 1e-3


def test_mix_token_matches_timm_given_the_same_box(monkeypatch):
  import timm.models.volo as timm_volo  # pylint: disable=import-outside-toplevel
  reference = randomised_timm_volo("volo_d1", use_mix_token=True).train()
  images = nhwc_batch(4, 224, seed=4)
  model = converted_volo(reference, "volo_d1", mix_token=True)
  model.train()
  cls, aux, box = nnx.jit(lambda m, x: m.forward_train(x))(model, jnp.asarray(images))
  box = tuple(int(b) for b in box)
  assert 0 <= box[0] <= box[2] <= 14 and 0 <= box[1] <= box[3] <= 14
  monkeypatch.setattr(timm_volo, "rand_bbox", lambda *args, **kwargs: box)
  with torch.no_grad():
    cls_feat, ref_aux, ref_box = reference.forward_train(torch.from_numpy(images).permute(0, 3, 1, 2))
  assert tuple(ref_box) == box
  assert relative_error(cls, reference.head(cls_feat).detach().numpy()) <= 1e-4
  assert relative_error(aux, ref_aux.numpy()) <= 1e-4


def test_mix_token_box_distribution():
  """Box side = int(14·√(1−λ)) with λ ~ U(0, 1), centre uniform, edges clipped: check its moments."""
  model = volo_jax.create_model("volo_d1", mix_token=True)
  boxes = np.stack([np.asarray(model._mix_token_box(14, 14)) for _ in range(400)])
  assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 2] <= 14).all() and (boxes[:, 0] >= 0).all()
  heights = boxes[:, 2] - boxes[:, 0]
  assert heights.max() <= 14 and 3 < heights.mean() < 9
  assert not np.all(boxes == boxes[0])


def test_features_match_timm_features():
  """forward_features: the normalised token sequence, class token first; a model without classes returns the class
  token's features."""
  reference = randomised_timm_volo("volo_d1", num_classes=0)
  images = nhwc_batch(2, 224, seed=5)
  with torch.no_grad():
    expected = reference.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  model = converted_volo(reference, "volo_d1")
  model.eval()
  assert not hasattr(model, "head")
  features = nnx.jit(lambda m, x: m.forward_features(x))(model, jnp.asarray(images))
  assert features.shape == (2, 1 + 14 * 14, 384) and relative_error(features, expected) <= 1e-4
  assert relative_error(_forward(model, images), expected[:, 0]) <= 1e-4


def test_drop_path_schedule_matches_timm():
  reference = randomised_timm_volo("volo_d2", drop_path_rate=0.3)
  model = volo_jax.create_model("volo_d2", drop_path_rate=0.3)
  for stage in (0, 2, 3, 4):
    for ours, theirs in zip(model.network[stage], reference.network[stage]):
      branch = getattr(theirs, "drop_path1", None) or theirs.drop_path  # timm renamed it over versions
      expected = getattr(branch, "drop_prob", 0.0)
      assert ours.drop_path.rate == pytest.approx(expected)
  assert model.network[4][-1].drop_path.rate == pytest.approx(0.3)
  assert all(block.drop_path.rate == 0 for block in model.network[0])


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  model = volo_jax.create_model("volo_d1", img_size=224, dtype=jnp.bfloat16)
  reference = volo_jax.create_model("volo_d1", img_size=224)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  images = nhwc_batch(2, 224, seed=6)
  model.eval()
  reference.eval()
  low, high = _forward(model, images), _forward(reference, images)
  assert low.dtype == jnp.float32
  assert relative_error(low, high) < 0.05


@pytest.mark.parametrize("img_size", [384, 448, 512])
def test_other_image_sizes(img_size):
  model = nnx.eval_shape(lambda: volo_jax.create_model("volo_d1", img_size=img_size))
  assert model.pos_embed.shape == (1, img_size // 16, img_size // 16, 384)
  out = jax.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32))
  assert out.shape == (1, 1000)


def test_rejects_bad_names_and_sizes():
  with pytest.raises(ValueError, match="unknown model"):
    volo_jax.create_model("volo_d9")
  with pytest.raises(ValueError, match="multiple of"):
    volo_jax.create_model("volo_d1", img_size=200)
