"""VOLO + UperNet: the backbone's stage maps against timm's forward_intermediates, weight conversion both ways
(transformers' heads load their parts strictly), scanned blocks and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import converted_volo, nhwc_batch, randomised_timm_volo, relative_error, torch
from volo_jax.convert import segmenter as convert
from volo_jax.models.segmenter import create_segmenter

modeling_upernet = pytest.importorskip("transformers.models.upernet.modeling_upernet")
UperNetConfig = pytest.importorskip("transformers").UperNetConfig

CROP, CLASSES = 64, 5
SMALL = dict(channels=32, aux_channels=16)  # head widths: the math does not depend on them


def _segmenter(seed=0, **kwargs):
  return create_segmenter("volo_tiny", CLASSES, img_size=CROP, seed=seed, **SMALL, **kwargs)


def test_stage_maps_match_timm_intermediates():
  """/8 = the outlooker stage's output, /16 = the last stage's through the final norm (timm's norm=True)."""
  reference = randomised_timm_volo("volo_tiny", img_size=CROP)
  model = converted_volo(reference, "volo_tiny")
  model.eval()
  images = nhwc_batch(2, CROP, seed=5)
  with torch.no_grad():
    maps = reference.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), norm=True,
                                           intermediates_only=True)
  x8, x16 = nnx.jit(lambda m, x: m.forward_stage_maps(x))(model, jnp.asarray(images))
  assert x8.shape == (2, CROP // 8, CROP // 8, 64) and x16.shape == (2, CROP // 16, CROP // 16, 128)
  assert relative_error(x8, maps[0].permute(0, 2, 3, 1).numpy()) <= 1e-4
  assert relative_error(x16, maps[-1].permute(0, 2, 3, 1).numpy()) <= 1e-4


def _randomised_state(model, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tensors = {}
  for key, value in convert.state_dict(model).items():
    if key.endswith("num_batches_tracked"):
      tensors[key] = value
    elif key.endswith("running_var"):
      tensors[key] = (0.5 + rng.random(value.shape)).astype(np.float32)
    else:
      tensors[key] = (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
  return tensors


def test_state_dict_round_trip_and_transformers_heads_load_strictly():
  model = _segmenter(seed=0)
  tensors = _randomised_state(model, seed=1)
  assert {k.split(".")[0] for k in tensors} == {"backbone", "neck", "decode_head", "auxiliary_head"}
  assert not any(k.startswith(("backbone.cls_token", "backbone.post_network")) for k in tensors)
  other = _segmenter(seed=2)
  report = convert.load_state_dict(other, tensors)
  assert not report.left_at_init and all(k.endswith("num_batches_tracked") for k in report.ignored)
  back = convert.state_dict(other)
  assert back.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  config = UperNetConfig(hidden_size=SMALL["channels"], pool_scales=[1, 2, 3, 6],
                         auxiliary_channels=SMALL["aux_channels"], auxiliary_num_convs=1,
                         auxiliary_concat_input=False, num_labels=CLASSES)
  levels = list(other.neck.channels)
  for prefix, head in (("decode_head.", modeling_upernet.UperNetHead(config, in_channels=levels)),
                       ("auxiliary_head.", modeling_upernet.UperNetFCNHead(config, in_channels=levels))):
    part = {k[len(prefix):]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(prefix)}
    head.load_state_dict(part, strict=True)

  with pytest.raises(Exception, match="does not have"):
    convert.load_state_dict(other, {**tensors, "decode_head.extra.weight": np.zeros(1, np.float32)})


def test_classification_checkpoint_loads_into_the_backbone():
  """A 224 ImageNet-style checkpoint: class path and heads dropped, pos_embed resized to crop/16."""
  reference = randomised_timm_volo("volo_tiny", img_size=224)
  tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = _segmenter()
  report = convert.load_backbone_state_dict(model, tensors)
  assert report.resized and any(k.startswith("post_network.") for k in report.ignored)
  assert model.backbone.pos_embed.shape == (1, CROP // 16, CROP // 16, 128)
  np.testing.assert_array_equal(model.backbone.network[1].proj.kernel[...],
                                tensors["network.1.proj.weight"].transpose(2, 3, 1, 0))


def test_scanned_and_bfloat16_segmenters():
  """scan_blocks=True gives the per-layer model's outputs from the same weights; a bfloat16 forward runs and
  stays close; forward_train returns the /4 and /16 logits."""
  plain = _segmenter()
  tensors = _randomised_state(plain, seed=3)
  convert.load_state_dict(plain, tensors)
  scanned = _segmenter(scan_blocks=True)
  convert.load_state_dict(scanned, tensors)
  half = _segmenter(dtype=jnp.bfloat16)
  convert.load_state_dict(half, tensors)
  images = jnp.asarray(nhwc_batch(2, CROP, seed=6))
  outputs = []
  for model in (plain, scanned, half):
    model.eval()
    outputs.append(nnx.jit(lambda m, x: m(x))(model, images))
  assert outputs[0].shape == (2, CROP // 4, CROP // 4, CLASSES) and outputs[2].dtype == jnp.float32
  assert relative_error(outputs[1], outputs[0]) <= 1e-5
  assert relative_error(outputs[2], outputs[0]) <= 0.1
  scanned.train()
  main, aux = nnx.jit(lambda m, x: m.forward_train(x))(scanned, images)
  assert main.shape == (2, CROP // 4, CROP // 4, CLASSES) and aux.shape == (2, CROP // 16, CROP // 16, CLASSES)
  assert np.isfinite(np.asarray(main)).all() and np.isfinite(np.asarray(aux)).all()
  assert jax.tree.leaves(nnx.state(scanned.decode_head, nnx.BatchStat))  # running statistics exist to update


class _TorchSegmenter(torch.nn.Module):
  """The PyTorch composite our segmenter mirrors: timm VOLO's stage maps, the pyramid, transformers' heads."""

  def __init__(self, backbone, levels):
    super().__init__()
    config = UperNetConfig(hidden_size=SMALL["channels"], pool_scales=[1, 2, 3, 6],
                           auxiliary_channels=SMALL["aux_channels"], auxiliary_num_convs=1,
                           auxiliary_concat_input=False, num_labels=CLASSES)
    self.backbone = backbone
    self.neck = torch.nn.Module()
    self.neck.up = torch.nn.ConvTranspose2d(levels[0], levels[0], 2, stride=2)
    self.decode_head = modeling_upernet.UperNetHead(config, in_channels=list(levels))
    self.auxiliary_head = modeling_upernet.UperNetFCNHead(config, in_channels=list(levels))

  def forward(self, images):
    maps = self.backbone.forward_intermediates(images, norm=True, intermediates_only=True)
    x8, x16 = maps[0], maps[-1]
    levels = [self.neck.up(x8), x8, x16, torch.nn.functional.max_pool2d(x16, 2)]
    return self.decode_head(levels), self.auxiliary_head(levels)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_segmenter_matches_torch_composite(train):
  """The whole model from one state dict: decode and aux logits ≤ 1e-4 relative, eval and train (batch stats)."""
  model = _segmenter(dropout_rate=0.0)  # transformers' heads have no dropout
  tensors = _randomised_state(model, seed=7)
  convert.load_state_dict(model, tensors)
  reference = _TorchSegmenter(randomised_timm_volo("volo_tiny", img_size=CROP), model.neck.channels)
  sd = {k: torch.from_numpy(v) for k, v in tensors.items()}
  backbone_sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
  missing = reference.backbone.load_state_dict(backbone_sd, strict=False).missing_keys
  assert all(k.startswith(("cls_token", "post_network.", "head.", "aux_head.")) for k in missing)
  reference.load_state_dict({**reference.state_dict(), **sd}, strict=True)
  reference.train(train)
  model.train() if train else model.eval()
  images = nhwc_batch(2, CROP, seed=8)
  with torch.no_grad():
    ref_main, ref_aux = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  main, aux = nnx.jit(lambda m, x: m.forward_train(x))(model, jnp.asarray(images))
  main_error = relative_error(main, ref_main.permute(0, 2, 3, 1).numpy())
  aux_error = relative_error(aux, ref_aux.permute(0, 2, 3, 1).numpy())
  print(f"segmenter {'train' if train else 'eval'}: decode {main_error:.2e}, aux {aux_error:.2e}")
  assert main_error <= 1e-4 and aux_error <= 1e-4


@pytest.mark.parametrize("size", [(64, 112), (80, 112)])
def test_slide_logits_match_mmseg_loop(size):
  """mmseg's slide_inference loop written out: one window at a time, F.interpolate to the crop, summed, averaged."""
  from volo_jax.models.segmenter import slide_logits  # pylint: disable=import-outside-toplevel
  model = _segmenter()
  model.eval()
  height, width = size
  images = np.random.default_rng(9).standard_normal((2, height, width, 3)).astype(np.float32)
  stride = 48
  forward = nnx.jit(lambda m, x: m(x))
  preds = np.zeros((2, CLASSES, height, width), np.float32)
  count = np.zeros((1, 1, height, width), np.float32)
  h_grids = max(height - CROP + stride - 1, 0) // stride + 1
  w_grids = max(width - CROP + stride - 1, 0) // stride + 1
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * stride, w_idx * stride
      y2, x2 = min(y1 + CROP, height), min(x1 + CROP, width)
      y1, x1 = max(y2 - CROP, 0), max(x2 - CROP, 0)
      logits = torch.from_numpy(np.array(forward(model, jnp.asarray(images[:, y1:y2, x1:x2])))).permute(0, 3, 1, 2)
      preds[:, :, y1:y2, x1:x2] += torch.nn.functional.interpolate(logits, size=(CROP, CROP), mode="bilinear",
                                                                   align_corners=False).numpy()
      count[:, :, y1:y2, x1:x2] += 1
  assert h_grids * w_grids > 1 and count.min() >= 1
  ours = nnx.jit(slide_logits, static_argnums=(2, 3))(model, jnp.asarray(images), CROP, stride)
  assert relative_error(ours, (preds / count).transpose(0, 2, 3, 1)) <= 1e-5


def test_canvas_slide_equals_each_image_slid_alone():
  """Images of different sizes padded to one canvas score like mmseg's loop on each image alone (slide_logits)."""
  from volo_jax.models.segmenter import slide_canvas_logits, slide_logits  # pylint: disable=import-outside-toplevel
  model = _segmenter()
  model.eval()
  sizes = [(96, 144), (64, 100), (80, 64)]
  images = np.zeros((3, 96, 144, 3), np.float32)
  rng = np.random.default_rng(3)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.standard_normal((h, w, 3))
  stride = 40
  ours = nnx.jit(lambda m, x, s: slide_canvas_logits(m, x, s, crop=CROP, stride=stride))(
      model, jnp.asarray(images), jnp.asarray(sizes, jnp.int32))
  for i, (h, w) in enumerate(sizes):
    alone = nnx.jit(slide_logits, static_argnums=(2, 3))(model, jnp.asarray(images[i:i + 1, :h, :w]), CROP, stride)
    assert relative_error(ours[i, :h, :w], alone[0]) <= 1e-5


class PointwiseHead(nnx.Module):
  """A 1×1 conv at full resolution: translation-equivariant, so any window tiling must give the whole-image output."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.conv = nnx.Conv(3, num_classes, (1, 1), rngs=nnx.Rngs(0))

  def __call__(self, images):
    return self.conv(images)


@pytest.mark.parametrize("size,stride", [((70, 90), 21), ((32, 32), 32), ((50, 33), 13)])
def test_sliding_windows_cover_every_pixel_and_equal_the_whole_image(size, stride):
  from volo_jax.models.segmenter import slide_canvas_logits  # pylint: disable=import-outside-toplevel
  head = PointwiseHead(CLASSES)
  h, w = size
  images = np.zeros((1, 72, 96, 3), np.float32)
  images[0, :h, :w] = np.random.default_rng(1).standard_normal((h, w, 3))
  out = slide_canvas_logits(head, jnp.asarray(images), jnp.asarray([[h, w]], jnp.int32), crop=32, stride=stride)
  whole = head(jnp.asarray(images))
  np.testing.assert_allclose(out[0, :h, :w], whole[0, :h, :w], rtol=1e-5, atol=1e-6)  # zero where uncovered


def test_flip_and_multi_scale_test_time():
  """Flip averaging leaves a mirror-symmetric (pointwise) model's probabilities unchanged; a second scale's
  logits come back to the base size through resize_valid, which equals upernet.resize_bilinear per image."""
  from volo_jax.models import segmenter  # pylint: disable=import-outside-toplevel
  from volo_jax.models.upernet import resize_bilinear  # pylint: disable=import-outside-toplevel
  head = PointwiseHead(CLASSES)
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.standard_normal((2, 40, 48, 3)), jnp.float32)
  sizes = jnp.asarray([[40, 48], [33, 29]], jnp.int32)
  flipped = segmenter.predict_logits(head, (images,), (sizes,), sizes, (40, 48), crop=32, stride=16, flip=True)
  plain = jax.nn.softmax(segmenter.slide_canvas_logits(head, images, sizes, crop=32, stride=16), axis=-1)
  np.testing.assert_allclose(flipped[1, :33, :29], plain[1, :33, :29], rtol=1e-5, atol=1e-6)
  x = jnp.asarray(rng.standard_normal((2, 30, 40, 3)), jnp.float32)
  resized = segmenter.resize_valid(x, jnp.asarray([[30, 40], [20, 25]]), jnp.asarray([[45, 70], [33, 50]]), (50, 80))
  np.testing.assert_allclose(resized[0, :45, :70], resize_bilinear(x[:1], (45, 70))[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(resized[1, :33, :50], resize_bilinear(x[1:, :20, :25], (33, 50))[0], rtol=1e-6,
                             atol=1e-6)


def test_pos_embed_of_a_224_checkpoint_resized_to_a_512_crop_as_the_official_loader():
  """The official fine-tuning loader's math: F.interpolate(pos_embed, crop/16, mode='bicubic', align_corners=False)."""
  reference = randomised_timm_volo("volo_tiny", img_size=224)
  tensors = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = create_segmenter("volo_tiny", CLASSES, img_size=512, **SMALL)
  convert.load_backbone_state_dict(model, tensors)
  expected = torch.nn.functional.interpolate(torch.from_numpy(tensors["pos_embed"]).permute(0, 3, 1, 2), size=(32, 32),
                                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
  assert relative_error(model.backbone.pos_embed[...], expected) <= 1e-6
