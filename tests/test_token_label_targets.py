"""Token-label targets and loss against the TokenLabeling package `tlt` (0.2.0): its RoIAlign target builder
(`tlt/data/mixup.py`, loaded by path: the `tlt.data` package does not import with current timm), its
TokenLabelCrossEntropy, and torchvision's roi_align for the geometrically correct box."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from torch_reference import torch
from volo_jax.train import token_label_targets

tlt = pytest.importorskip("tlt")
from tlt.loss import TokenLabelCrossEntropy  # noqa: E402  pylint: disable=wrong-import-position
from torchvision.ops import roi_align  # noqa: E402  pylint: disable=wrong-import-position


def _tlt_mixup_module():
  path = os.path.join(os.path.dirname(tlt.__file__), "data", "mixup.py")
  spec = importlib.util.spec_from_file_location("tlt_data_mixup", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _random_maps(rng, batch: int, size: int, num_classes: int, topk: int = 5):
  """Released-format label maps: float16 [B, 2, k, S, S], descending top-k logits and distinct class indices."""
  scores = -np.sort(-rng.standard_normal((batch, topk, size, size)) * 3, axis=1)
  classes = np.argsort(rng.random((batch, num_classes, size, size)), axis=1)[:, :topk]
  return np.stack([scores, classes], axis=1).astype(np.float16)


def _random_crops(rng, batch: int):
  """Crop boxes (top, left, h, w) as fractions of integer pixel boxes, as timm's RandomResizedCrop yields."""
  height, width = rng.integers(120, 500, batch), rng.integers(120, 500, batch)
  h = (height * rng.uniform(0.2, 1.0, batch)).astype(int)
  w = (width * rng.uniform(0.2, 1.0, batch)).astype(int)
  top = (rng.random(batch) * (height - h + 1)).astype(int)
  left = (rng.random(batch) * (width - w + 1)).astype(int)
  return np.stack([top / height, left / width, h / height, w / width], 1).astype(np.float32)


def _tlt_targets(maps, crops, flips, labels, num_classes, token_size, smoothing, lam=1.0):
  """tlt's per-sample flip (label.flip(3)) with the mirrored box, then mixup_target(λ): (B, K, 2 + P²)."""
  maps = torch.from_numpy(maps.astype(np.float32))
  coords = crops.copy()
  flips = np.asarray(flips, bool)
  maps[flips] = maps[flips].flip(4)  # a sample's [2, k, S, S].flip(3)
  coords[flips, 1] = 1.0 - crops[flips, 1] - crops[flips, 3]  # its crop is drawn on the flipped image
  coords_map = torch.zeros_like(maps[:, :1])
  coords_map[:, 0, 0, 0, :4] = torch.from_numpy(coords)
  coords_map[:, 0, 0, 0, 5] = torch.from_numpy(labels.astype(np.float32))
  target = torch.cat([maps, coords_map], 1)
  return _tlt_mixup_module().mixup_target(target, num_classes, lam=lam, smoothing=smoothing, device="cpu",
                                          label_size=token_size).numpy()


def _ours(maps, crops, flips, labels, num_classes, token_size, smoothing, transposed_box=True):
  batch = {"label_scores": jnp.asarray(maps[:, 0]), "label_classes": jnp.asarray(maps[:, 1].astype(np.int16)),
           "crop_box": jnp.asarray(crops), "flip": jnp.asarray(flips), "label": jnp.asarray(labels)}
  return token_label_targets.build_targets(batch, num_classes=num_classes, token_size=token_size,
                                           smoothing=smoothing, transposed_box=transposed_box)


@pytest.mark.parametrize("token_size,map_size", [(14, 18), (4, 18), (24, 18)])
def test_targets_equal_tlt_roi_align_builder(token_size, map_size):
  """Including the transposed-box quirk, flips and the 1×1 crop label; 1000 classes as ImageNet."""
  rng = np.random.default_rng(token_size)
  batch, num_classes = 6, 1000
  maps = _random_maps(rng, batch, map_size, num_classes)
  crops = _random_crops(rng, batch)
  crops[0] = (0.0, 0.0, 1.0, 1.0)  # the whole image
  flips = np.array([0, 1, 0, 1, 1, 0], bool)
  labels = rng.integers(0, num_classes, batch)
  expected = _tlt_targets(maps, crops, flips, labels, num_classes, token_size, 0.1)
  ours = _ours(maps, crops, flips, labels, num_classes, token_size, 0.1)
  ours = np.concatenate([np.asarray(ours["gt"])[:, :, None], np.asarray(ours["cls"])[:, :, None],
                         np.asarray(ours["tokens"]).transpose(0, 2, 1)], axis=2)
  assert ours.shape == expected.shape == (batch, num_classes, 2 + token_size ** 2)
  # float32 round-off: on these inputs torchvision's float32 roi_align is itself 1.2e-5 from its float64 result.
  np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-5)


def test_geometric_box_is_torchvision_roi_align_of_the_crop():
  """transposed_box=False samples rows over the crop's vertical extent: roi_align with (x1, y1, x2, y2) =
  (left, top, right, bottom), then the image's flip applied to the tokens."""
  rng = np.random.default_rng(3)
  batch, num_classes, size, token_size = 4, 50, 18, 7
  maps = _random_maps(rng, batch, size, num_classes)
  crops = _random_crops(rng, batch)
  flips = np.array([0, 1, 0, 1], bool)
  labels = rng.integers(0, num_classes, batch)
  dense = np.zeros((batch, num_classes, size, size), np.float32)
  for b in range(batch):
    np.put_along_axis(dense[b], maps[b, 1].astype(np.int64), maps[b, 0].astype(np.float32), axis=0)
  top, left, h, w = crops.T
  boxes = np.stack([np.arange(batch), left * size - 0.5, top * size - 0.5, (left + w) * size - 0.5,
                    (top + h) * size - 0.5], 1).astype(np.float32)
  sampled = roi_align(torch.from_numpy(dense), torch.from_numpy(boxes), (token_size, token_size)).numpy()
  sampled[flips] = sampled[flips][..., ::-1]
  ours = _ours(maps, crops, flips, labels, num_classes, token_size, 0.1, transposed_box=False)["tokens"]
  np.testing.assert_allclose(np.asarray(ours), _smoothed(sampled, num_classes), rtol=0, atol=3e-5)


def _smoothed(logits_bkpp, num_classes, smoothing=0.1):
  off = smoothing / num_classes
  probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(logits_bkpp)), 1).numpy()
  return (probs * (1.0 - smoothing + off) + off).reshape(probs.shape[0], num_classes, -1).transpose(0, 2, 1)


@pytest.mark.parametrize("ground_truth", [False, True])
@pytest.mark.parametrize("box", [(0, 0, 0, 0), (2, 5, 11, 13), (0, 3, 14, 9)])
def test_loss_equals_tlt_token_label_cross_entropy(ground_truth, box):
  """TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0) on random logits and tlt-built targets, with and
  without a MixToken box (λ-mix of the crop label with the batch-reversed one) and the GT variant."""
  rng = np.random.default_rng(7)
  batch, num_classes, token_size = 6, 1000, 14
  maps = _random_maps(rng, batch, 18, num_classes)
  crops, flips = _random_crops(rng, batch), rng.random(batch) < 0.5
  labels = rng.integers(0, num_classes, batch)
  labels[:3] = np.asarray(_ours(maps, crops, flips, labels, num_classes, 1, 0.1)["cls"]).argmax(-1)[:3]  # agree
  target = _tlt_targets(maps, crops, flips, labels, num_classes, token_size, 0.1)
  cls_logits = rng.standard_normal((batch, num_classes)).astype(np.float32) * 3
  aux_logits = rng.standard_normal((batch, token_size ** 2, num_classes)).astype(np.float32) * 3
  loss_fn = TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0, ground_truth=ground_truth)
  expected = loss_fn((torch.from_numpy(cls_logits), torch.from_numpy(aux_logits), box),
                     torch.from_numpy(target)).item()
  targets = {"gt": jnp.asarray(target[:, :, 0]), "cls": jnp.asarray(target[:, :, 1]),
             "tokens": jnp.asarray(target[:, :, 2:].transpose(0, 2, 1))}
  ours = token_label_targets.token_label_loss(jnp.asarray(cls_logits), jnp.asarray(aux_logits), jnp.asarray(box),
                                              targets, dense_weight=0.5, cls_weight=1.0, ground_truth=ground_truth)
  assert float(ours) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("ops", [("Rotate",), ("ShearX",), ("ShearY",), ("TranslateXRel",), ("TranslateYRel",),
                                 ("Rotate", "ShearY")])
def test_warped_targets_follow_randaugment_geometry(ops):
  """Each token's warped target points where the RandAugment-ed image's pixels at that token came from
  (the image ops are tested against timm in test_randaugment.py): position-coded image vs position-coded
  target on a 16×16 grid of 4-pixel tokens, ops composed in order as rand_augment composes them."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from volo_jax.data import randaugment  # pylint: disable=import-outside-toplevel
  size, grid = 64, 16
  x = (np.arange(size) + 0.5) / size * 255
  image = np.stack(np.broadcast_arrays(x[None, :], x[:, None], np.full((size, size), 128.0)), -1)
  image, matrix = tf.constant(np.round(image), tf.float32), tf.eye(3)
  for i, name in enumerate(ops):
    op, negate = tf.constant(randaugment.OP_NAMES.index(name)), tf.constant(i % 2 == 0)
    image = randaugment.apply_op(image, op, tf.constant(6.0), negate)
    matrix = matrix @ randaugment.op_matrix(op, tf.constant(6.0), negate)
  blocks = image.numpy().reshape(grid, size // grid, grid, size // grid, 3)
  filled = (blocks[..., 2] != 128).any(axis=(1, 3))  # blocks that hold fill colour (blue 104)
  from_image = blocks.mean(axis=(1, 3))[..., :2] / 255  # (x, y) of each token's pixels before the ops
  tokens = 10 * np.eye(grid * grid, dtype=np.float32).reshape(1, grid, grid, grid * grid)  # class = p·16 + q
  warped = np.asarray(token_label_targets.warp_tokens(jnp.asarray(tokens), jnp.asarray(matrix.numpy())[None]))[0]
  outside = (warped == 0).all(-1)
  cell = warped.argmax(-1)
  from_target = (np.stack([cell % grid, cell // grid], -1) + 0.5) / grid
  inside = ~filled & ~outside
  assert inside.sum() > 100 and (outside <= filled).all()  # tokens from outside the image are filled ones
  assert np.abs(from_target - from_image)[inside].max() < 0.6 / grid  # the nearest token: ½ token + rounding


def test_mixup_mixes_token_targets_as_tlt_token_label_mixup():
  """With config.mixup on, every target (GT, crop label, token labels) is mixed with the images' λ and the
  batch-reversed partner, as tlt's mixup_target(target, lam) does for TokenLabelMixup."""
  import jax  # pylint: disable=import-outside-toplevel
  from volo_jax.train import mixup  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(11)
  batch, num_classes, token_size = 4, 1000, 4
  maps, crops = _random_maps(rng, batch, 18, num_classes), _random_crops(rng, batch)
  flips, labels = np.array([0, 1, 1, 0], bool), rng.integers(0, num_classes, batch)
  images = jnp.asarray(rng.standard_normal((batch, 8, 8, 3)).astype(np.float32))
  targets = _ours(maps, crops, flips, labels, num_classes, token_size, 0.1)
  mixed, mixed_targets = mixup.mix(jax.random.key(0), images, targets, mixup_alpha=0.8, cutmix_alpha=0.0)
  lam = float(np.median((mixed - images[::-1]) / (images - images[::-1])))  # the blend's λ
  assert 0.0 < lam < 1.0
  expected = _tlt_targets(maps, crops, flips, labels, num_classes, token_size, 0.1, lam=lam)
  ours = np.concatenate([np.asarray(mixed_targets["gt"])[:, :, None], np.asarray(mixed_targets["cls"])[:, :, None],
                         np.asarray(mixed_targets["tokens"]).transpose(0, 2, 1)], axis=2)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-5)
