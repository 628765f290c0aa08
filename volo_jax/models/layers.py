"""VOLO's building blocks other than outlook attention: MLP, self-attention, class attention, the blocks that
wrap them, the convolutional stem and the stage-1 → stage-2 downsample. Inputs are channels-last.

Plain JAX autodiff on every backend. The products a backend may want to replace are static attributes (each
nnx.Linear's `dot_general`, `Attention.attention_core`); `volo_jax.cpu.kernels.use_cpu_kernels` swaps them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from volo_jax.models.dropout import DropPath, dropout
from volo_jax.models.initializers import conv_kernel_init, linear_bias_init, linear_kernel_init
from volo_jax.models.outlook import OutlookAttention

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.
BATCH_NORM_MOMENTUM = 0.9  # PyTorch momentum 0.1


def dense(in_features: int, out_features: int, *, use_bias: bool = True, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_init=linear_kernel_init,
                    bias_init=linear_bias_init, dot_general=jax.lax.dot_general, rngs=rngs)


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm computed and returned in float32 whatever the compute dtype."""
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, dtype=jnp.float32, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as PyTorch computes it, x·(1 + erf(x/√2))/2: `jax.nn.gelu(approximate=False)` uses erfc, whose
  XLA:CPU expansion (and its derivative's) is much dearer."""
  return 0.5 * x * (1 + jax.lax.erf(x * (2 ** -0.5)))


def _softmax_f32(logits: jax.Array, dtype) -> jax.Array:
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, dropout=None) -> jax.Array:
  """softmax(q·kᵀ)·v over (B, heads, N, head_dim) inputs, q already scaled, the softmax in float32; `dropout`
  (a callable or None) applies to the attention weights between softmax and product."""
  attn = _softmax_f32(jnp.einsum("bhqd,bhkd->bhqk", q, k), v.dtype)
  if dropout is not None:
    attn = dropout(attn)
  return jnp.einsum("bhqk,bhkd->bhqd", attn, v)


class Mlp(nnx.Module):
  """fc1 → exact (erf) GELU → fc2, with optional dropout after each."""

  def __init__(self, dim: int, hidden: int, *, drop: float = 0.0, dtype, rngs: nnx.Rngs):
    self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)
    self.drop = dropout(drop, rngs)

  def __call__(self, x):
    x = self.drop(gelu(self.fc1(x)))
    return self.drop(self.fc2(x))


class Attention(nnx.Module):
  """Multi-head self-attention over all tokens of a (B, H, W, C) map.

  attention_core: static hook with `attention_core`'s signature and result (the plain one by default).
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, attn_drop: float = 0.0,
               dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = dense(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)
    self.attn_drop = dropout(attn_drop, rngs)
    self.attention_core = attention_core

  def __call__(self, x):
    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads)  # PyTorch's (3, heads, hd)
    # Heads-first operands make both products plain batched matmuls (XLA:CPU is slow on the other layout).
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # 3 × (B, heads, N, head_dim)
    # Scaling q rather than the N×N scores (as timm does) is the same product to float rounding and saves a pass
    # over the scores forward and backward.
    dropping = self.attn_drop.rate > 0 and not self.attn_drop.deterministic
    # out: (B, heads, N, head_dim)
    out = self.attention_core(q * self.scale, k, v, self.attn_drop if dropping else None)
    return self.proj(jnp.transpose(out, (0, 2, 1, 3)).reshape(b, h, w, c))


class ClassAttention(nnx.Module):
  """CaiT class attention: only the class token queries; keys and values come from every token."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False, attn_drop: float = 0.0,
               dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.kv = dense(dim, 2 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.q = dense(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)
    self.attn_drop = dropout(attn_drop, rngs)

  def __call__(self, x):
    b, n, c = x.shape
    kv = self.kv(x).reshape(b, n, 2, self.num_heads, c // self.num_heads)  # PyTorch's (2, heads, hd)
    k, v = jnp.transpose(kv, (2, 0, 3, 1, 4))  # 2 × (B, heads, N, head_dim), heads-first as in Attention
    q = self.q(x[:, :1]).reshape(b, self.num_heads, c // self.num_heads) * self.scale
    attn = _softmax_f32(jnp.einsum("bnd,bnkd->bnk", q, k), v.dtype)
    cls = jnp.einsum("bnk,bnkd->bnd", self.attn_drop(attn), v).reshape(b, 1, c)
    return self.proj(cls)


class _PreNormBlock(nnx.Module):
  """x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

  def __init__(self, dim: int, attn: nnx.Module, *, mlp_ratio: float, drop_path_rate: float, dtype,
               rngs: nnx.Rngs):
    self.norm1 = layer_norm(dim, rngs)
    self.attn = attn
    self.norm2 = layer_norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = DropPath(drop_path_rate, rngs)

  def __call__(self, x, drop_path_rate=None):
    """drop_path_rate: this layer's rate when it is traced (scanned stacks); None uses the static one."""
    x = x + self.drop_path(self.attn(self.norm1(x)), drop_path_rate)
    return x + self.drop_path(self.mlp(self.norm2(x)), drop_path_rate)


class Outlooker(_PreNormBlock):
  """Stage-1 block around outlook attention."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, attn_drop: float,
               drop_path_rate: float, dtype, rngs: nnx.Rngs):
    attn = OutlookAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, dtype=dtype, rngs=rngs)
    super().__init__(dim, attn, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, dtype=dtype, rngs=rngs)


class Transformer(_PreNormBlock):
  """Stage-2 block around multi-head self-attention."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, attn_drop: float,
               drop_path_rate: float, dtype, rngs: nnx.Rngs):
    attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, dtype=dtype, rngs=rngs)
    super().__init__(dim, attn, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, dtype=dtype, rngs=rngs)


class ClassBlock(nnx.Module):
  """Post-network block: updates only the class token (row 0) of a (B, 1+N, C) sequence."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, attn_drop: float,
               dtype, rngs: nnx.Rngs):
    self.norm1 = layer_norm(dim, rngs)
    self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(dim, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    cls = x[:, :1] + self.attn(self.norm1(x))
    cls = cls + self.mlp(self.norm2(cls))
    return jnp.concatenate([cls.astype(x.dtype), x[:, 1:]], axis=1)


class PatchEmbed(nnx.Module):
  """Stem: 7×7/2 conv → three (conv, BN, ReLU) → 4×4/4 conv to the stage-1 width. Net stride 8.

  Native convolutions; on XLA:CPU `volo_jax.cpu.xla` keeps them in XLA's own kernels, where they are fast.
  """

  def __init__(self, in_chans: int, hidden_dim: int, embed_dim: int, *, patch_size: int = 8, dtype,
               rngs: nnx.Rngs):
    conv = dict(use_bias=False, dtype=dtype, kernel_init=conv_kernel_init, rngs=rngs)
    self.convs = nnx.List([
        nnx.Conv(in_chans, hidden_dim, (7, 7), strides=2, padding=((3, 3), (3, 3)), **conv),
        nnx.Conv(hidden_dim, hidden_dim, (3, 3), strides=1, padding=((1, 1), (1, 1)), **conv),
        nnx.Conv(hidden_dim, hidden_dim, (3, 3), strides=1, padding=((1, 1), (1, 1)), **conv),
    ])
    self.norms = nnx.List([
        nnx.BatchNorm(hidden_dim, momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        for _ in range(3)
    ])
    stride = patch_size // 2
    self.proj = nnx.Conv(hidden_dim, embed_dim, (stride, stride), strides=stride, padding="VALID",
                         dtype=dtype, kernel_init=conv_kernel_init, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.relu(norm(conv(x)))
    return self.proj(x)


class Downsample(nnx.Module):
  """2×2 stride-2 conv between the outlooker and transformer stages."""

  def __init__(self, in_dim: int, out_dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj = nnx.Conv(in_dim, out_dim, (2, 2), strides=2, padding="VALID", dtype=dtype,
                         kernel_init=conv_kernel_init, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)
