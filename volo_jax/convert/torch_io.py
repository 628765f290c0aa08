"""Reading and writing PyTorch-side weight files without ever executing code from them.

`.safetensors` is read with safetensors' numpy API (no torch needed). Pickled `.pth`/`.pth.tar`/`.bin` files are
read with `torch.load(weights_only=True)`, allow-listing only argparse.Namespace (the official trainer pickles its
args); anything else in the pickle is refused.
"""

import argparse
import os
import zipfile

import numpy as np

from volo_jax.errors import CheckpointError, first_line

SAFETENSORS_SUFFIX = ".safetensors"


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError("reading/writing .pth files needs PyTorch: pip install -r requirements-torch.txt") from e
  return torch


def _read_pickle(path: str) -> dict:
  torch = _torch()
  if not zipfile.is_zipfile(path):
    # torch.save has written zip archives since 1.6; the legacy format is refused rather than guessed at.
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive; truncated or another format?)")
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError … depending on the damage
    raise CheckpointError(f"{path}: refused or unreadable checkpoint: {first_line(e)}") from e


def _to_numpy(value) -> np.ndarray:
  torch = _torch()
  if value.dtype in (torch.bfloat16, torch.float16):
    value = value.float()
  return value.detach().cpu().numpy()


def read_state_dict(path: str, *, use_ema: bool = False) -> dict[str, np.ndarray]:
  """PyTorch name → numpy array from an official .pth.tar, a timm state_dict, or a .safetensors file.

  Unwraps `state_dict_ema` (use_ema) / `state_dict` / a bare dict, strips `module.` prefixes and ignores entries
  that are not tensors (`args`, `epoch`, `optimizer`, …) as the official loader does.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file")
  if path.endswith(SAFETENSORS_SUFFIX):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      tensors = load_file(path)
    except Exception as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if use_ema:
      raise CheckpointError(f"{path}: a safetensors file holds one set of weights; there is no EMA to select")
  else:
    obj = _read_pickle(path)
    if not isinstance(obj, dict):
      raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if use_ema:
      if "state_dict_ema" not in obj:
        raise CheckpointError(f"{path}: --ema asked for, but the checkpoint has no 'state_dict_ema'")
      obj = obj["state_dict_ema"]
    elif "state_dict" in obj:
      obj = obj["state_dict"]
    torch = _torch()
    tensors = {k: _to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}
  tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
  if not tensors:
    raise CheckpointError(f"{path}: contains no tensors")
  return tensors


def write_state_dict(tensors: dict[str, np.ndarray], path: str) -> None:
  """Writes a flat state dict as .safetensors (no torch needed) or, for any other suffix, torch.save."""
  tmp = path + ".tmp"
  try:
    if path.endswith(SAFETENSORS_SUFFIX):
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
      save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
    else:
      torch = _torch()
      with open(tmp, "wb") as f:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, f)  # writable copies
    os.replace(tmp, path)  # never leave a half-written file under the final name
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
