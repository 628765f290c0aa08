"""PyTorch reference models for the tests: timm's VOLO (same state_dict names as the official code) with every
tensor randomised, saved in the official trainer's checkpoint format."""

import argparse

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def randomised_timm_volo(name: str, img_size: int = 224, num_classes: int = 1000, seed: int = 0, **kwargs):
  """timm volo_dX (our volo_tiny: timm's VOLO class at its shape) with random weights, biases, LayerNorm/BatchNorm
  affines and BatchNorm running stats."""
  torch.manual_seed(seed)
  if name == "volo_tiny":  # ours, not in timm: timm's VOLO class with our variant's shape
    from volo_jax.models.volo import VARIANTS  # pylint: disable=import-outside-toplevel
    v = VARIANTS[name]
    model = timm.models.volo.VOLO(list(v.layers), img_size=img_size, num_classes=num_classes,
                                  stem_hidden_dim=v.stem_hidden_dim, embed_dims=list(v.embed_dims),
                                  num_heads=list(v.num_heads), mlp_ratio=v.mlp_ratio, **kwargs)
  else:
    model = timm.create_model(f"{name}_224", pretrained=False, img_size=img_size, num_classes=num_classes,
                              **kwargs)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for key, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=gen)
      if key.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
      elif key.endswith("running_mean") or key.endswith("bias"):
        tensor.copy_(0.1 * noise)
      elif tensor.ndim == 1:  # LayerNorm / BatchNorm scales
        tensor.copy_(1.0 + 0.1 * noise)
      else:  # kernels, pos_embed, cls_token: keep the init's scale, new values
        tensor.copy_(noise * tensor.std().clamp(min=0.02))
  return model.eval()


def converted_volo(timm_model, name: str, **kwargs):
  """Our `name` at the timm model's image size and classes, loaded with its state_dict (every tensor of ours
  set; only BatchNorm's num_batches_tracked left over). kwargs go to create_model."""
  from volo_jax import create_model  # pylint: disable=import-outside-toplevel
  from volo_jax.convert.mapping import load_state_dict  # pylint: disable=import-outside-toplevel
  model = create_model(name, img_size=timm_model.pos_embed.shape[1] * 16, num_classes=timm_model.num_classes,
                       **kwargs)
  report = load_state_dict(model, {k: v.numpy() for k, v in timm_model.state_dict().items()})
  assert not report.left_at_init and all(k.endswith("num_batches_tracked") for k in report.ignored)
  return model


def save_official_checkpoint(model, path, *, ema_model=None, module_prefix: bool = False):
  """The dict timm's CheckpointSaver writes for the official trainer (pickled argparse args included)."""
  def prefixed(sd):
    return {("module." + k if module_prefix else k): v for k, v in sd.items()}

  ckpt = {
      "epoch": 299, "arch": "volo_d1", "version": 2, "metric": 84.2,
      "state_dict": prefixed(model.state_dict()),
      "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
      "args": argparse.Namespace(model="volo_d1", lr=1.6e-3, token_label=True),
  }
  if ema_model is not None:
    ckpt["state_dict_ema"] = prefixed(ema_model.state_dict())
  torch.save(ckpt, path)


def nhwc_batch(batch: int, img_size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((batch, img_size, img_size, 3)).astype(np.float32)


def torch_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)).numpy()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |Δ| / max |expected|, the issue's criterion."""
  return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())
