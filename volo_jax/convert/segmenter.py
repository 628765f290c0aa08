"""PyTorch state_dict ↔ VoloUperNet: `backbone.` + timm's VOLO names (volo_jax/convert/mapping.py), `neck.` + our
pyramid's names (PyTorch layouts: ConvTranspose2d's [in, out, kh, kw]), `decode_head.` / `auxiliary_head.` +
HF transformers' UperNetHead / UperNetFCNHead names, which those modules load with strict=True."""

import re

import numpy as np

from volo_jax.convert import mapping
from volo_jax.errors import CheckpointError

# (our module attribute, PyTorch prefix). PPM blocks are (AdaptiveAvgPool2d, ConvModule) Sequentials in PyTorch.
PARTS = (("neck", "neck."), ("decode_head", "decode_head."), ("auxiliary_head", "auxiliary_head."))
_PPM_OURS = re.compile(r"^psp_modules\.(\d+)\.")
_PPM_TORCH = re.compile(r"^psp_modules\.(\d+)\.1\.")
# Tensors of a classification checkpoint that the segmenter's backbone does not have.
CLASSIFICATION_ONLY = ("cls_token", "post_network.", "head.", "aux_head.")


def state_dict(model) -> dict[str, np.ndarray]:
  """The segmenter's weights under PyTorch names (numpy, float32)."""
  tensors = {f"backbone.{k}": v for k, v in mapping.state_dict(model.backbone).items()}
  for attr, prefix in PARTS:
    for name, value in mapping.state_dict(getattr(model, attr)).items():
      tensors[prefix + _PPM_OURS.sub(r"psp_modules.\1.1.", name)] = value
  return tensors


def load_state_dict(model, tensors: dict[str, np.ndarray], *, strict: bool = True) -> mapping.LoadReport:
  """Writes a `state_dict`-format dict into `model` (pos_embed resized to the crop as the VOLO loader does).
  Raises CheckpointError on a missing or misshapen tensor, or, when strict, a tensor no part takes."""
  report = mapping.LoadReport()
  used = set()
  for attr, prefix in (("backbone", "backbone."),) + PARTS:
    part = {}
    for key, value in tensors.items():
      if key.startswith(prefix):
        name = key[len(prefix):]
        part[_PPM_TORCH.sub(r"psp_modules.\1.", name) if attr == "decode_head" else name] = value
        used.add(key)
    sub = mapping.load_state_dict(getattr(model, attr), part, strict=strict)
    for field in ("loaded", "resized", "left_at_init", "ignored"):
      getattr(report, field).extend(f"{prefix}{n}" for n in getattr(sub, field))
  unused = [k for k in tensors if k not in used]
  if unused and strict:
    raise CheckpointError(f"{len(unused)} checkpoint tensors the segmenter does not have: {', '.join(unused[:3])}")
  report.ignored += unused
  return report


def load_backbone_state_dict(model, tensors: dict[str, np.ndarray]) -> mapping.LoadReport:
  """A classification checkpoint (timm/official names) into the segmenter's backbone: the class-attention path
  and heads are dropped, pos_embed is resized to the crop/16 grid."""
  kept = {k: v for k, v in tensors.items() if not k.startswith(CLASSIFICATION_ONLY)}
  report = mapping.load_state_dict(model.backbone, kept)
  report.ignored += [k for k in tensors if k not in kept]
  return report
