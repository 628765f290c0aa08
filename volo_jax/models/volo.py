"""VOLO (Yuan et al., arXiv 2106.13112): conv stem → outlooker stage → downsample → transformer stages →
class-attention blocks → class head + per-token aux head. Parameter names mirror the official PyTorch model
so that conversion is a rename (see volo_jax/convert/mapping.py)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from volo_jax.models import layers as L
from volo_jax.models.dropout import dropout
from volo_jax.models.initializers import embedding_init
from volo_jax.models.pretrained import eval_crop_pct
from volo_jax.models.stack import BlockStack, check_remat, checkpointed, run_blocks

PATCH_SIZE = 8  # stem stride
POOLING_SCALE = 2  # the downsample after stage 1
STRIDE = PATCH_SIZE * POOLING_SCALE  # input pixels per stage-2 token


@dataclasses.dataclass(frozen=True)
class VoloVariant:
  layers: tuple[int, int, int, int]
  embed_dims: tuple[int, int, int, int]
  num_heads: tuple[int, int, int, int]
  mlp_ratio: float = 3.0
  stem_hidden_dim: int = 64


VARIANTS = {
    "volo_d1": VoloVariant((4, 4, 8, 2), (192, 384, 384, 384), (6, 12, 12, 12)),
    "volo_d2": VoloVariant((6, 4, 10, 4), (256, 512, 512, 512), (8, 16, 16, 16)),
    "volo_d3": VoloVariant((8, 8, 16, 4), (256, 512, 512, 512), (8, 16, 16, 16)),
    "volo_d4": VoloVariant((8, 8, 16, 4), (384, 768, 768, 768), (12, 16, 16, 16)),
    "volo_d5": VoloVariant((12, 12, 20, 4), (384, 768, 768, 768), (12, 16, 16, 16), mlp_ratio=4.0,
                           stem_hidden_dim=128),
    # Ours, not the paper's: a small member for the embedded digits default and for fast tests.
    "volo_tiny": VoloVariant((2, 2, 1, 1), (64, 128, 128, 128), (2, 4, 4, 4), stem_hidden_dim=32),
}

def default_crop_pct(name: str, img_size: int) -> float:
  """timm's eval crop_pct of the released weights (models/pretrained.py: 0.96 at 224, 1.0 at 384/448, 1.15 for
  d4/d5 at 448 and 512); for other sizes and variants 0.96 up to 224, else 1.0."""
  return eval_crop_pct(name, img_size) or (0.96 if img_size <= 224 else 1.0)


def parse_model_name(name: str) -> tuple[str, int | None]:
  """'volo_d1' → ('volo_d1', None); timm-style 'volo_d1_384' → ('volo_d1', 384)."""
  match = re.fullmatch(r"(volo_d[1-5]|volo_tiny)(?:_(\d+))?", name)
  if not match:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)} (optionally _<img_size>)")
  return match.group(1), int(match.group(2)) if match.group(2) else None


class VOLO(nnx.Module):
  """The VOLO family on NHWC images; `model.eval()` / `model.train()` switch the forward as in PyTorch.

  `model(images)` gives logits; `forward_features` the normalised token sequence; `forward_train` the class and
  per-token logits with the MixToken box that token labeling trains on (timm's names).
  """

  def __init__(self, variant: VoloVariant, *, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
               num_classes: int = 1000, qkv_bias: bool = False, drop_rate: float = 0.0,
               pos_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
               mix_token: bool = False, scan_blocks: bool = False,
               remat: str = "none", dtype=jnp.float32, rngs: nnx.Rngs):
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if height % STRIDE or width % STRIDE:
      raise ValueError(f"image size {height}×{width} is not a multiple of VOLO's stride {STRIDE}")
    layers, dims, heads, ratio = variant.layers, variant.embed_dims, variant.num_heads, variant.mlp_ratio
    check_remat(remat)
    self.num_classes, self.mix_token = num_classes, mix_token
    self.scan_blocks, self.remat = scan_blocks, remat
    self.deterministic = False  # model.eval() sets True, model.train() False
    self.dtype = dtype

    self.patch_embed = L.PatchEmbed(in_chans, variant.stem_hidden_dim, dims[0], patch_size=PATCH_SIZE,
                                    dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(embedding_init(rngs.params(), (1, height // STRIDE, width // STRIDE, dims[-1])))
    self.pos_drop = dropout(pos_drop_rate, rngs)

    block_kw = dict(mlp_ratio=ratio, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, dtype=dtype)

    def outlooker(rate, block_rngs):
      return L.Outlooker(dims[0], heads[0], drop_path_rate=rate, **block_kw, rngs=block_rngs)

    def transformer(stage):
      return lambda rate, block_rngs: L.Transformer(dims[stage], heads[stage], drop_path_rate=rate, **block_kw,
                                                    rngs=block_rngs)

    # Official drop-path schedule: block j of all stages (outlookers included in the count) gets
    # rate·j/(Σlayers − 1), but the outlooker builder never receives the rate, so stage 1 gets none.
    total = sum(layers)
    rates = [0.0] * layers[0] + [drop_path_rate * j / (total - 1) for j in range(layers[0], total)]
    names = [f"network.{0 if stage == 0 else stage + 1}.{i}" for stage in range(4) for i in range(layers[stage])]
    downsample = lambda: L.Downsample(dims[0], dims[1], dtype=dtype, rngs=rngs)
    if scan_blocks:  # one stack for stage 1, one for stages 2–4 (same width and heads in every variant)
      if len(set(dims[1:])) > 1 or len(set(heads[1:])) > 1:
        raise ValueError("scan_blocks needs stages 2–4 of equal width and heads")
      n = layers[0]
      network = [BlockStack(outlooker, rates[:n], names[:n], remat=remat, rngs=rngs), downsample(),
                 BlockStack(transformer(1), rates[n:], names[n:], remat=remat, rngs=rngs)]
    else:
      ends = [sum(layers[:stage + 1]) for stage in range(4)]
      network = [nnx.List([outlooker(rate, rngs) for rate in rates[:ends[0]]]), downsample()]
      network += [nnx.List([transformer(stage)(rate, rngs) for rate in rates[ends[stage - 1]:ends[stage]]])
                  for stage in range(1, 4)]
    self.network = nnx.List(network)

    self.cls_token = nnx.Param(embedding_init(rngs.params(), (1, 1, dims[-1])))
    self.post_network = nnx.List([L.ClassBlock(dims[-1], heads[-1], **block_kw, rngs=rngs)
                                  for _ in range(2)])
    self.norm = L.layer_norm(dims[-1], rngs)
    self.head_drop = dropout(drop_rate, rngs)
    if num_classes > 0:
      self.head = L.dense(dims[-1], num_classes, dtype=dtype, rngs=rngs)
      self.aux_head = L.dense(dims[-1], num_classes, dtype=dtype, rngs=rngs)
    self.mix_rngs = rngs["mix_token"].fork() if mix_token else None

  def forward_features(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, in_chans) → normalised (B, 1 + H/16·W/16, C) token sequence, class token first."""
    return self._class_tokens(self._stages(self.patch_embed(images)))

  def forward_stage_maps(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, in_chans) → the outlooker stage's (B, H/8, W/8, C0) map and the last transformer stage's
    (B, H/16, W/16, C) map through the final `norm`, for dense heads. Class attention leaves patch tokens as they
    are, so the /16 map is the normalised one the token-labeling aux head reads.

    No class-attention blocks or heads run; the /8 map is not normalised.
    """
    x8 = self._stage(self.network[0], self.patch_embed(images))
    return x8, self.norm(self._transformer_stages(x8))

  def _stages(self, x: jax.Array) -> jax.Array:
    """Stem output (B, H/8, W/8, C0) → the last transformer stage's (B, H/16, W/16, C) map."""
    return self._transformer_stages(self._stage(self.network[0], x))  # outlookers, (B, H/8, W/8, C0)

  def _transformer_stages(self, x: jax.Array) -> jax.Array:
    """The outlooker stage's (B, H/8, W/8, C0) map → downsample, position embedding, transformer stages."""
    x = self.network[1](x)  # (B, H/16, W/16, C)
    x = self.pos_drop(x + self.pos_embed[...])
    for stage in self.network[2:]:
      x = self._stage(stage, x)
    return x

  def _stage(self, blocks, x: jax.Array) -> jax.Array:
    return blocks(x) if isinstance(blocks, BlockStack) else run_blocks(blocks, x, self.remat)

  def _class_tokens(self, x: jax.Array) -> jax.Array:
    """(B, h, w, C) map → class token prepended, class-attention blocks, final norm: (B, 1 + h·w, C)."""
    b, h, w, c = x.shape
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, c)).astype(x.dtype)
    x = jnp.concatenate([cls, x.reshape(b, h * w, c)], axis=1)
    call = checkpointed(lambda block, x: block(x), self.remat)
    for block in self.post_network:
      x = call(block, x)
    return self.norm(x)

  def __call__(self, images: jax.Array) -> jax.Array:
    """images (B, H, W, in_chans) float32 → logits (B, classes), float32.

    eval: head(cls) + 0.5·max over tokens of aux_head(tokens), as the official model returns; train: head(cls).
    With num_classes=0, the class token's features (B, C).
    """
    x = self.forward_features(images)
    cls_feat, token_feat = x[:, 0], x[:, 1:]
    if self.num_classes == 0:
      return cls_feat
    cls = self.head(self.head_drop(cls_feat)).astype(jnp.float32)
    if not self.deterministic:
      return cls
    aux = self.aux_head(token_feat).astype(jnp.float32)
    return cls + 0.5 * aux.max(axis=1)

  def forward_train(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images → (head(cls) (B, classes), aux_head(tokens) (B, N, classes), MixToken box), logits in float32.

    In train mode a model built with mix_token pastes a box of the batch-reversed images' stem features in and
    pastes the per-token logits back; the box is (row1, col1, row2, col2) on the token grid, zeros without
    MixToken. With num_classes=0, the class and token features instead of logits.
    """
    x = self.patch_embed(images)
    box = jnp.zeros((4,), jnp.int32)
    mixing = self.mix_token and not self.deterministic
    if mixing:
      box = self._mix_token_box(x.shape[1] // POOLING_SCALE, x.shape[2] // POOLING_SCALE)
      x = _paste_box(x, box * POOLING_SCALE)
    x = self._class_tokens(self._stages(x))
    cls_feat, token_feat = x[:, 0], x[:, 1:]
    if self.num_classes == 0:
      return cls_feat, token_feat, box
    cls = self.head(self.head_drop(cls_feat)).astype(jnp.float32)
    aux = self.aux_head(token_feat).astype(jnp.float32)
    if mixing:  # undo the paste on the per-token predictions
      b, n, k = aux.shape
      grid = (b, images.shape[1] // STRIDE, images.shape[2] // STRIDE, k)
      aux = _paste_box(aux.reshape(grid), box).reshape(b, n, k)
    return cls, aux, box

  def _mix_token_box(self, rows: int, cols: int) -> jax.Array:
    """The official MixToken box: λ ~ Beta(1, 1), side·√(1−λ) cut, uniform centre, edges clipped."""
    lam_key, row_key, col_key = jax.random.split(self.mix_rngs(), 3)
    cut_ratio = jnp.sqrt(1.0 - jax.random.beta(lam_key, 1.0, 1.0))
    cut_r = jnp.floor(rows * cut_ratio).astype(jnp.int32)
    cut_c = jnp.floor(cols * cut_ratio).astype(jnp.int32)
    cr = jax.random.randint(row_key, (), 0, rows)
    cc = jax.random.randint(col_key, (), 0, cols)
    return jnp.stack([jnp.clip(cr - cut_r // 2, 0, rows), jnp.clip(cc - cut_c // 2, 0, cols),
                      jnp.clip(cr + cut_r // 2, 0, rows), jnp.clip(cc + cut_c // 2, 0, cols)])


def _paste_box(x: jax.Array, box: jax.Array) -> jax.Array:
  """x[:, r1:r2, c1:c2] ← x[::-1, r1:r2, c1:c2] (batch-reversed partner), as a select: no scatter."""
  rows = jnp.arange(x.shape[1])
  cols = jnp.arange(x.shape[2])
  in_rows = (rows >= box[0]) & (rows < box[2])
  in_cols = (cols >= box[1]) & (cols < box[3])
  mask = (in_rows[:, None] & in_cols[None, :])[None, :, :, None]
  return jnp.where(mask, x[::-1], x)


def create_model(name: str, *, img_size: int | None = None, num_classes: int = 1000, seed: int = 0,
                 **kwargs) -> VOLO:
  """Builds `volo_d1` … `volo_d5` (or timm-style `volo_d1_384`) with freshly initialised parameters."""
  variant_name, name_size = parse_model_name(name)
  return VOLO(VARIANTS[variant_name], img_size=img_size or name_size or 224, num_classes=num_classes,
              rngs=nnx.Rngs(seed), **kwargs)
