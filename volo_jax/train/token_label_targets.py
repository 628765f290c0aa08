"""Token labeling (Jiang et al. 2021, package `tlt`): dense soft targets from an annotator's top-k score maps,
built per batch inside the jitted step, and the token-label loss.

The target of an image is tlt's: the top-k logits scattered into a dense K-class map (other classes 0),
RoIAlign-sampled (torchvision semantics, aligned=False, adaptive sampling count) over the image's crop box to
P×P tokens and to 1×1 for the crop, softmax over classes, then `p·on + off` label smoothing. RoIAlign is
separable: a (P, S) row matrix and a (P, S) column matrix per image, applied with two float32 einsums.
"""

import math

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST  # the targets stay float32 on TPU/GPU matmul units too


def _interpolation_matrix(start, end, out_size: int, map_size: int, max_grid: int):
  """torchvision roi_align along one axis: (B,) roi edges in map cells → (B, out_size, map_size) weights whose
  outer product with the other axis' matrix is RoIAlign (bilinear samples averaged per bin)."""
  length = jnp.maximum(end - start, 1.0)  # aligned=False
  bin_size = length / out_size
  grid = jnp.ceil(length / out_size)  # adaptive sampling count per bin, (B,)
  bins = jnp.arange(out_size, dtype=jnp.float32)
  samples = jnp.arange(max_grid, dtype=jnp.float32)
  # (B, P, G) sample positions, in torchvision's order of float32 operations.
  pos = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]
         + (samples[None, None, :] + 0.5) * bin_size[:, None, None] / grid[:, None, None])
  used = (samples[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= map_size)
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos)
  at_edge = low >= map_size - 1
  low = jnp.where(at_edge, map_size - 1.0, low)
  frac = jnp.where(at_edge, 0.0, pos - low)
  high = jnp.minimum(low + 1.0, map_size - 1.0)
  cells = jnp.arange(map_size, dtype=jnp.float32)
  weights = ((cells == low[..., None]) * (1.0 - frac)[..., None]
             + (cells == high[..., None]) * frac[..., None])  # (B, P, G, S)
  weights = jnp.where(used[..., None], weights, 0.0)
  return weights.sum(axis=2) / grid[:, None, None]


def roi_align(dense: jax.Array, rows: tuple, cols: tuple, out_size: int) -> jax.Array:
  """dense (B, S, S, K) → (B, out, out, K): RoIAlign over rows [r0, r1] × cols [c0, c1] (map cells, (B,) each)."""
  size = dense.shape[1]
  max_grid = math.ceil(size / out_size) + 1  # roi lengths stay within the map (≤ S cells)
  row_m = _interpolation_matrix(*rows, out_size, size, max_grid)
  col_m = _interpolation_matrix(*cols, out_size, size, max_grid)
  x = jnp.einsum("bqs,brsk->brqk", col_m, dense, precision=_HIGHEST)
  return jnp.einsum("bpr,brqk->bpqk", row_m, x, precision=_HIGHEST)


def dense_map(scores: jax.Array, classes: jax.Array, num_classes: int) -> jax.Array:
  """Top-k (B, k, S, S) scores and class indices → (B, S, S, K) float32, absent classes 0 (tlt's scatter)."""
  scores = jnp.moveaxis(scores.astype(jnp.float32), 1, -1)  # (B, S, S, k)
  classes = jnp.moveaxis(classes.astype(jnp.int32), 1, -1)
  hit = classes[..., None] == jnp.arange(num_classes)  # (B, S, S, k, K), fused into the sum by XLA
  return jnp.where(hit, scores[..., None], 0.0).sum(axis=-2)


def crop_rois(crop_box: jax.Array, flip: jax.Array, map_size: int, transposed_box: bool):
  """The crop box (top, left, h, w) of the unflipped image, normalised, and the flip → the (rows, cols) roi edges
  on the (flipped) map in cells, as tlt passes them to roi_align (edges · S − 0.5).

  tlt flips before cropping, so its box is the mirror of ours when flipped. It hands torchvision
  (top, left, bottom, right) as (x1, y1, x2, y2): rows are sampled over the crop's horizontal extent and columns
  over its vertical one. `transposed_box=True` reproduces that (the paper's runs), False samples the crop itself.
  """
  top, left, height, width = (crop_box[:, i].astype(jnp.float32) for i in range(4))
  left = jnp.where(flip, 1.0 - left - width, left)
  vertical = (top * map_size - 0.5, (top + height) * map_size - 0.5)
  horizontal = (left * map_size - 0.5, (left + width) * map_size - 0.5)
  return (horizontal, vertical) if transposed_box else (vertical, horizontal)


def warp_tokens(tokens: jax.Array, geometry: jax.Array) -> jax.Array:
  """Token logits (B, P, P, K) → the same grid after the image's RandAugment rotate/shear/translate: each token
  takes the logits of the token nearest to where its centre came from (`geometry`, (B, 3, 3) output → input
  in [0, 1]² coordinates); tokens from outside the image get logits 0, as tlt fills warped maps with score 0."""
  b, p, _, k = tokens.shape
  centres = (jnp.arange(p, dtype=jnp.float32) + 0.5) / p
  v, u = jnp.meshgrid(centres, centres, indexing="ij")  # rows (y), columns (x)
  points = jnp.stack([u.ravel(), v.ravel(), jnp.ones(p * p)])  # (3, P²) as (x, y, 1)
  source = jnp.einsum("bij,jn->bin", geometry.astype(jnp.float32), points, precision=_HIGHEST)
  col, row = jnp.floor(source[:, 0] * p), jnp.floor(source[:, 1] * p)  # (B, P²)
  inside = (col >= 0) & (col < p) & (row >= 0) & (row < p)
  index = jnp.where(inside, row * p + col, 0).astype(jnp.int32)
  warped = jnp.take_along_axis(tokens.reshape(b, p * p, k), index[..., None], axis=1)  # (B, P², K) row gather
  return jnp.where(inside[..., None], warped, 0.0).reshape(b, p, p, k)


def build_targets(batch: dict, *, num_classes: int, token_size: int, smoothing: float,
                  transposed_box: bool = True) -> dict:
  """tlt's targets for a batch with 'label', 'label_scores', 'label_classes', 'crop_box', 'flip' and optionally
  'label_geometry' (`warp_tokens`; the crop label is not warped):
  {'gt': (B, K) smoothed one-hot, 'cls': (B, K) crop label, 'tokens': (B, P², K) row-major}, float32."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  scores, classes, flip = batch["label_scores"], batch["label_classes"], batch["flip"].astype(bool)
  scores = jnp.where(flip[:, None, None, None], scores[..., ::-1], scores)  # tlt flips the map on W
  classes = jnp.where(flip[:, None, None, None], classes[..., ::-1], classes)
  dense = dense_map(scores, classes, num_classes)
  rows, cols = crop_rois(batch["crop_box"], flip, dense.shape[1], transposed_box)
  b = dense.shape[0]
  tokens = roi_align(dense, rows, cols, token_size)
  if "label_geometry" in batch:
    tokens = warp_tokens(tokens, batch["label_geometry"])
  tokens = tokens.reshape(b, token_size * token_size, num_classes)
  crop = roi_align(dense, rows, cols, 1).reshape(b, num_classes)
  gt = jax.nn.one_hot(batch["label"], num_classes) * (on - off) + off
  return {"gt": gt, "cls": jax.nn.softmax(crop, axis=-1) * on + off,
          "tokens": jax.nn.softmax(tokens, axis=-1) * on + off}


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1).mean()


def token_label_loss(cls_logits: jax.Array, aux_logits: jax.Array, box: jax.Array, targets: dict, *,
                     dense_weight: float = 0.5, cls_weight: float = 1.0, ground_truth: bool = False) -> jax.Array:
  """tlt's TokenLabelCrossEntropy in float32: cls_weight·CE(cls, crop label mixed by the MixToken λ)
  + dense_weight·CE(every token's aux logits, its token label). `box` (r1, c1, r2, c2) on the token grid.

  ground_truth (the fine-tunes): before the λ-mix the crop label leans on the smoothed GT, half-half when their
  argmaxes agree, 0.9 crop label / 0.1 GT when they do not.
  """
  b, n, k = aux_logits.shape
  t_cls = targets["cls"]
  if ground_truth:
    agree = jnp.argmax(targets["gt"], -1) == jnp.argmax(t_cls, -1)
    ratio = jnp.where(agree, 0.5, 0.9)[:, None]
    t_cls = t_cls * ratio + targets["gt"] * (1.0 - ratio)
  lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1]) / n
  t_cls = lam * t_cls + (1.0 - lam) * t_cls[::-1]
  dense = _soft_cross_entropy(aux_logits.reshape(b * n, k), targets["tokens"].reshape(b * n, k))
  return cls_weight * _soft_cross_entropy(cls_logits, t_cls) + dense_weight * dense
