"""timm's pretrained configs of the released VOLO weights (`timm/volo_*.sail_in1k` on the Hugging Face Hub): the
one table of their eval transform (input size, crop_pct, interpolation, mean, std) and class count."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TAG = "sail_in1k"

# name: (input size, eval crop_pct), as timm's volo.py default_cfgs.
_RELEASED = {
    "volo_d1_224": (224, 0.96), "volo_d1_384": (384, 1.0),
    "volo_d2_224": (224, 0.96), "volo_d2_384": (384, 1.0),
    "volo_d3_224": (224, 0.96), "volo_d3_448": (448, 1.0),
    "volo_d4_224": (224, 0.96), "volo_d4_448": (448, 1.15),
    "volo_d5_224": (224, 0.96), "volo_d5_448": (448, 1.15), "volo_d5_512": (512, 1.15),
}


def _cfg(size: int, crop_pct: float) -> dict:
  return {"num_classes": 1000, "input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": "bicubic",
          "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "patch_embed.conv.0",
          "classifier": ("head", "aux_head"), "fixed_input_size": True}


PRETRAINED_CFGS = {f"{name}.{TAG}": _cfg(*value) for name, value in _RELEASED.items()}


def pretrained_cfg(name: str) -> dict:
  """The config of 'volo_d1_224.sail_in1k' (or 'volo_d1_224', the default tag); KeyError if not released."""
  return PRETRAINED_CFGS[name if "." in name else f"{name}.{TAG}"]


def hub_id(name: str) -> str:
  """'volo_d1_224.sail_in1k' → 'timm/volo_d1_224.sail_in1k'."""
  name = name if "." in name else f"{name}.{TAG}"
  pretrained_cfg(name)
  return f"timm/{name}"


def eval_crop_pct(variant: str, img_size: int) -> float | None:
  """crop_pct of the released weights of `variant` at `img_size`, None if there are none."""
  cfg = PRETRAINED_CFGS.get(f"{variant}_{img_size}.{TAG}")
  return cfg["crop_pct"] if cfg else None
