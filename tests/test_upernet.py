"""UperNet pieces against PyTorch: resampling against torch.nn.functional, the decode and auxiliary heads against
HF transformers' UperNetHead / UperNetFCNHead with random weights and BatchNorm statistics, the pyramid's shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import relative_error, torch
from volo_jax.convert import mapping
from volo_jax.convert.segmenter import _PPM_TORCH
from volo_jax.models import upernet

modeling_upernet = pytest.importorskip("transformers.models.upernet.modeling_upernet")
UperNetConfig = pytest.importorskip("transformers").UperNetConfig
F = torch.nn.functional

IN_CHANNELS = (16, 16, 24, 24)  # the pyramid's levels, like VOLO's (C0, C0, C, C) at small widths
CHANNELS, AUX_CHANNELS, CLASSES = 32, 16, 5


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _nhwc(t) -> np.ndarray:
  return t.permute(0, 2, 3, 1).detach().numpy()


@pytest.mark.parametrize("in_size,out_size", [((4, 4), (16, 16)), ((3, 5), (24, 40)), ((7, 9), (5, 4)),
                                              ((6, 6), (3, 5)), ((1, 1), (3, 3)), ((16, 12), (64, 45))])
def test_resize_bilinear_matches_interpolate(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((2, *in_size, 3)).astype(np.float32)
  ref = _nhwc(F.interpolate(_nchw(x), size=out_size, mode="bilinear", align_corners=False))
  ours = jax.jit(upernet.resize_bilinear, static_argnums=1)(jnp.asarray(x), out_size)
  assert ours.shape == ref.shape and relative_error(ours, ref) <= 1e-6  # float rounding of another sum order


@pytest.mark.parametrize("in_size,out_size", [((8, 8), (1, 1)), ((8, 8), (2, 2)), ((8, 8), (3, 3)), ((7, 10), (6, 6)),
                                              ((3, 5), (6, 6)), ((16, 12), (3, 2)), ((4, 4), (4, 4))])
def test_adaptive_avg_pool_matches_torch(in_size, out_size):
  x = np.random.default_rng(1).standard_normal((2, *in_size, 3)).astype(np.float32)
  ref = _nhwc(F.adaptive_avg_pool2d(_nchw(x), out_size))
  ours = upernet.adaptive_avg_pool(jnp.asarray(x), out_size)
  assert ours.shape == ref.shape and relative_error(ours, ref) <= 1e-6


def test_pyramid_up_matches_conv_transpose():
  """The /4 level: our ConvTranspose under PyTorch's [in, out, kh, kw] layout is ConvTranspose2d(k=2, s=2)."""
  pyramid = upernet.Pyramid(4, 6, dtype=jnp.float32, rngs=nnx.Rngs(0))
  reference = torch.nn.ConvTranspose2d(4, 4, 2, stride=2)
  tensors = mapping.state_dict(pyramid)
  with torch.no_grad():
    reference.weight.copy_(torch.tensor(tensors["up.weight"]))
    reference.bias.copy_(torch.tensor(tensors["up.bias"]))
  rng = np.random.default_rng(2)
  x8, x16 = rng.standard_normal((2, 6, 10, 4), np.float32), rng.standard_normal((2, 3, 5, 6), np.float32)
  levels = pyramid(jnp.asarray(x8), jnp.asarray(x16))
  assert relative_error(levels[0], _nhwc(reference(_nchw(x8)))) <= 1e-6
  assert relative_error(levels[3], _nhwc(F.max_pool2d(_nchw(x16), 2))) == 0
  assert [lv.shape[1:] for lv in levels] == [(12, 20, 4), (6, 10, 4), (3, 5, 6), (1, 2, 6)]


def _randomise(module, seed: int):
  """Every float tensor of a PyTorch module random, BatchNorm running statistics included."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for key, tensor in module.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if key.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif key.endswith(("running_mean", "bias")):
        tensor.copy_(0.1 * noise)
      elif tensor.ndim == 1:
        tensor.copy_(1.0 + 0.1 * noise)
      else:
        tensor.copy_(noise / np.sqrt(tensor[0].numel()))
  return module


def _ours_name(torch_name: str) -> str:
  """transformers' `psp_modules.i.1.…` (pool, ConvModule) → our `psp_modules.i.…` (the pool has no weights)."""
  return _PPM_TORCH.sub(r"psp_modules.\1.", torch_name)


def _reference_heads():
  config = UperNetConfig(hidden_size=CHANNELS, pool_scales=[1, 2, 3, 6], auxiliary_channels=AUX_CHANNELS,
                         auxiliary_num_convs=1, auxiliary_concat_input=False, num_labels=CLASSES)
  decode = _randomise(modeling_upernet.UperNetHead(config, in_channels=list(IN_CHANNELS)), 0)
  aux = _randomise(modeling_upernet.UperNetFCNHead(config, in_channels=list(IN_CHANNELS)), 1)
  return decode, aux


def _our_heads(decode_ref, aux_ref):
  """Ours without dropout (transformers' heads have none), loaded strictly from the references' state dicts."""
  decode = upernet.UperNetHead(IN_CHANNELS, CLASSES, channels=CHANNELS, dropout_rate=0.0, rngs=nnx.Rngs(0))
  aux = upernet.FCNHead(IN_CHANNELS[2], CLASSES, channels=AUX_CHANNELS, dropout_rate=0.0, rngs=nnx.Rngs(1))
  mapping.load_state_dict(decode, {_ours_name(k): v.numpy() for k, v in decode_ref.state_dict().items()})
  mapping.load_state_dict(aux, {k: v.numpy() for k, v in aux_ref.state_dict().items()})
  return decode, aux


def _levels(size: tuple[int, int], seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  h, w = size
  return [rng.standard_normal((2, h // 2 ** i, w // 2 ** i, c), np.float32) for i, c in enumerate(IN_CHANNELS)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_heads_match_transformers(size, train):
  """Logits of both heads ≤ 1e-4 relative; in train mode (batch statistics) the running statistics too."""
  decode_ref, aux_ref = _reference_heads()
  decode, aux = _our_heads(decode_ref, aux_ref)
  levels = _levels(size, seed=sum(size))
  for module in (decode_ref, aux_ref):
    module.train(train)
  for module in (decode, aux):
    module.train() if train else module.eval()
  with torch.no_grad():
    ref_main = _nhwc(decode_ref([_nchw(x) for x in levels]))
    ref_aux = _nhwc(aux_ref([_nchw(x) for x in levels]))
  run = nnx.jit(lambda d, a, xs: (d(xs), a(xs)))
  main, aux_logits = run(decode, aux, [jnp.asarray(x) for x in levels])
  assert main.shape == ref_main.shape == (2, *size, CLASSES)
  assert aux_logits.shape == ref_aux.shape == (2, size[0] // 4, size[1] // 4, CLASSES)
  main_error, aux_error = relative_error(main, ref_main), relative_error(aux_logits, ref_aux)
  print(f"{size} {'train' if train else 'eval'}: decode {main_error:.2e}, aux {aux_error:.2e}")
  assert main_error <= 1e-4 and aux_error <= 1e-4
  if train:  # PyTorch's running-statistics update (momentum 0.1, unbiased variance), PPM's 1×1 pool included
    ours = {**{f"d.{k}": v for k, v in mapping.state_dict(decode).items()},
            **{f"a.{k}": v for k, v in mapping.state_dict(aux).items()}}
    theirs = {**{f"d.{_ours_name(k)}": v.numpy() for k, v in decode_ref.state_dict().items()},
              **{f"a.{k}": v.numpy() for k, v in aux_ref.state_dict().items()}}
    for key in (k for k in theirs if k.endswith(("running_mean", "running_var"))):
      np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("crop", [512, 1024])
def test_pyramid_shapes(crop):
  from volo_jax.models.segmenter import create_segmenter  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: create_segmenter("volo_d1", 150, img_size=crop))
  images = jax.ShapeDtypeStruct((2, crop, crop, 3), jnp.float32)
  levels = nnx.eval_shape(lambda m, x: m.pyramid(x), model, images)
  assert [lv.shape for lv in levels] == [(2, crop // s, crop // s, c) for s, c in ((4, 192), (8, 192), (16, 384),
                                                                                   (32, 384))]
  main, aux = nnx.eval_shape(lambda m, x: m.forward_train(x), model, images)
  assert main.shape == (2, crop // 4, crop // 4, 150) and aux.shape == (2, crop // 16, crop // 16, 150)
