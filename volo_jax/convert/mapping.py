"""PyTorch state_dict ↔ Flax NNX state for VOLO: names, layouts and the official load-time changes.

Our module tree mirrors the official one, so a Flax path maps to a PyTorch name by joining it with dots, with
three exceptions: the stem's convs/norms sit at `patch_embed.conv.{0,3,6}` / `{1,4,7}` (ReLUs take the other
indices), Flax leaf names differ (kernel/scale → weight, mean/var → running_mean/var), and kernels are laid out
channels-last (Linear [out,in] → [in,out], Conv2d [out,in,kh,kw] → [kh,kw,in,out]). A scanned model's
`BlockStack` holds many PyTorch blocks in one leaf per tensor: slice [i] of the leaf is the PyTorch tensor of its
`layer_names[i]` block, so both block layouts read and write the same state dicts.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from volo_jax.convert.torch_io import read_state_dict, write_state_dict
from volo_jax.errors import CheckpointError
from volo_jax.models.stack import STACK_KEY, BlockStack

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_STEM_OFFSETS = {"convs": 0, "norms": 1}  # stem Sequential: conv, bn, relu ×3
HEAD_PREFIXES = ("head.", "aux_head.")
BICUBIC_A = -0.75  # PyTorch's cubic convolution coefficient


def torch_name(path: tuple) -> str:
  """Flax state path → official PyTorch state_dict key."""
  parts = [str(p) for p in path]
  if parts[0] == "patch_embed" and parts[1] in _STEM_OFFSETS:
    parts = ["patch_embed", "conv", str(3 * int(parts[2]) + _STEM_OFFSETS[parts[1]])] + parts[3:]
  if parts[-1] in _LEAF_NAMES and len(parts) > 1:
    parts[-1] = _LEAF_NAMES[parts[-1]]
  return ".".join(parts)


def _to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
  return value


def _to_flax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  return value


def _weight_state(model: nnx.Module):
  return nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))


def _tensor_slots(model: nnx.Module):
  """(PyTorch name, Flax path, layer index into a stacked leaf or None, variable) for every PyTorch tensor."""
  stacks = {path + (STACK_KEY,): node for path, node in nnx.iter_graph(model) if isinstance(node, BlockStack)}
  for path, var in _weight_state(model):
    prefix = next((p for p in stacks if path[:len(p)] == p), None)
    if prefix is None:
      yield torch_name(path), path, None, var
      continue
    inner = torch_name(path[len(prefix):])
    for layer, block_name in enumerate(stacks[prefix].layer_names):
      yield f"{block_name}.{inner}", path, layer, var


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights of the 4 taps at offsets −1, 0, 1, 2 for fractional positions t (PyTorch's a = −0.75 kernel)."""
  a = BICUBIC_A

  def near(d):  # |d| ≤ 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):  # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of `F.interpolate(mode='bicubic', align_corners=False)` along one axis.

  Source position (i + 0.5)·in/out − 0.5, four taps around it with indices clamped to the edge.
  """
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((out_size, in_size))
  for tap in range(4):
    index = np.clip(base.astype(int) - 1 + tap, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), weights[:, tap])
  return matrix


def resize_pos_embed(pos_embed: np.ndarray, height: int, width: int) -> np.ndarray:
  """(1, h, w, C) → (1, height, width, C) with PyTorch's bicubic resize, as the official fine-tuning loader."""
  rows = bicubic_matrix(pos_embed.shape[1], height)
  cols = bicubic_matrix(pos_embed.shape[2], width)
  out = np.einsum("Hh,Ww,bhwc->bHWc", rows, cols, pos_embed.astype(np.float64))
  return out.astype(pos_embed.dtype)


@dataclasses.dataclass
class LoadReport:
  """What a load did with every model parameter and every checkpoint tensor."""
  loaded: list[str] = dataclasses.field(default_factory=list)
  resized: list[str] = dataclasses.field(default_factory=list)
  left_at_init: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f"loaded {len(self.loaded)} tensors"]
    for label, names in (("resized", self.resized), ("left at init", self.left_at_init),
                         ("ignored from checkpoint", self.ignored)):
      if names:
        lines.append(f"{label}: {', '.join(names)}")
    return "\n".join(lines)


def _summarise(problem: str, items: list[str], limit: int = 3) -> str:
  more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
  return f"{problem}: {'; '.join(items[:limit])}{more}"


def load_state_dict(model: nnx.Module, tensors: dict[str, np.ndarray], *, strict: bool = True) -> LoadReport:
  """Writes PyTorch-named tensors into `model`, with the official fine-tuning changes.

  pos_embed is resized when the image size differs; head/aux_head are left at init when the class count
  differs (or the checkpoint has none); BatchNorm running stats go to the BatchStat collection. Raises
  CheckpointError (nothing written) on a shape mismatch, a missing tensor, or, when strict, unused tensors.
  """
  report, layers, mismatched, missing = LoadReport(), {}, [], []
  used = set()
  for name, path, layer, var in _tensor_slots(model):
    shape = var.get_value().shape[0 if layer is None else 1:]
    is_head = name.startswith(HEAD_PREFIXES)
    if name not in tensors:
      (report.left_at_init if is_head else missing).append(name)
      continue
    used.add(name)
    value = _to_flax_layout(path, tensors[name])
    if name == "pos_embed" and value.ndim == 4 and value.shape[-1] == shape[-1] and value.shape != shape:
      value = resize_pos_embed(value, shape[1], shape[2])
      report.resized.append(f"pos_embed {tuple(tensors[name].shape)} -> {shape}")
    elif is_head and value.shape != shape and value.shape[-1:] != shape[-1:]:
      report.left_at_init.append(name)  # another class count: fine-tuning starts a new head
      report.ignored.append(name)
      continue
    if value.shape != shape:
      mismatched.append(f"{name} checkpoint {tuple(tensors[name].shape)} vs model {_torch_shape(path, shape)}")
      continue
    layers.setdefault(path, {})[layer] = value
    report.loaded.append(name)
  unexpected = [k for k in tensors if k not in used and not k.endswith("num_batches_tracked")]
  if model_without_heads(model):
    head_tensors = [k for k in unexpected if k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in unexpected if k not in head_tensors]
    report.ignored += head_tensors
  if mismatched:
    raise CheckpointError(_summarise("checkpoint does not fit this model (wrong variant?)", mismatched))
  if missing:
    raise CheckpointError(_summarise(f"{len(missing)} model tensors missing from checkpoint", missing))
  if unexpected and strict:
    raise CheckpointError(_summarise(f"{len(unexpected)} checkpoint tensors this model does not have "
                                     "(wrong variant? strict=False ignores them)", unexpected))
  report.ignored += [k for k in tensors if k not in used and k not in report.ignored]
  nnx.update(model, nnx.from_flat_state(_stacked_updates(model, layers)))
  return report


def _stacked_updates(model: nnx.Module, layers: dict) -> dict:
  """{path: {layer index or None: value}} → {path: new leaf}, per-layer values stacked in layer order (all of a
  stacked leaf's layers loaded, or load_state_dict raised before). Copies: never alias the caller's buffers."""
  dtypes = {path: var.get_value().dtype for path, var in _weight_state(model)}
  stacked = lambda values: values[None] if None in values else np.stack([values[i] for i in sorted(values)])
  return {path: jnp.array(stacked(values), dtypes[path]) for path, values in layers.items()}


def model_without_heads(model: nnx.Module) -> bool:
  return getattr(model, "num_classes", 1) == 0


def _torch_shape(path: tuple, flax_shape: tuple) -> tuple:
  return _to_torch_layout(path, np.empty(flax_shape, np.uint8)).shape


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's weights as an official-format PyTorch state dict (numpy arrays, float32)."""
  tensors, host = {}, {}
  for name, path, layer, var in _tensor_slots(model):
    if path not in host:
      host[path] = np.asarray(var.get_value(), np.float32)
    value = host[path] if layer is None else host[path][layer]
    tensors[name] = np.asarray(_to_torch_layout(path, value))
    if path[-1] == "var":  # PyTorch BatchNorm also keeps a step counter, which strict loading expects
      tensors[name.removesuffix("running_var") + "num_batches_tracked"] = np.array(0, np.int64)
  return tensors


def load_torch_weights(model: nnx.Module, path: str, *, use_ema: bool = False, strict: bool = True) -> LoadReport:
  """Loads an official .pth.tar, a timm state_dict (.pth/.bin) or a .safetensors file into `model`."""
  return load_state_dict(model, read_state_dict(path, use_ema=use_ema), strict=strict)


def export_torch_weights(model: nnx.Module, path: str) -> None:
  """Writes a state dict that timm's volo_d* and the official models/volo.py load with strict=True."""
  write_state_dict(state_dict(model), path)
