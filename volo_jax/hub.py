"""Weights by name from the Hugging Face Hub, as timm: `create_model("volo_d1_224.sail_in1k", pretrained=True)`,
`load_pretrained(model, "hf-hub:timm/volo_d1_384.sail_in1k")`.

Files come through `huggingface_hub` into its standard cache (`HF_HUB_CACHE`), `model.safetensors` first and
`pytorch_model.bin` as timm falls back; `HF_HUB_OFFLINE=1` reads the cache only. A repo's `config.json` (timm's:
architecture, num_classes, pretrained_cfg, label_names) sets the model and its eval transform; the released
weights' configs are also in `volo_jax.models.pretrained`.
"""

import json
import os
import re

from volo_jax.errors import CheckpointError, first_line
from volo_jax.models import create_model as _create_model
from volo_jax.models import default_crop_pct, parse_model_name
from volo_jax.models import pretrained as pretrained_tags

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"


def is_hub_name(name: str) -> bool:
  """'hf-hub:<repo>' or a released name with its tag ('volo_d1_224.sail_in1k') that is no local file."""
  return name.startswith(HUB_PREFIX) or (name in pretrained_tags.PRETRAINED_CFGS and not os.path.exists(name))


def repo_id(name: str) -> str:
  """'hf-hub:timm/volo_d1_224.sail_in1k' or 'volo_d1_224.sail_in1k' → 'timm/volo_d1_224.sail_in1k'."""
  if name.startswith(HUB_PREFIX):
    rid = name[len(HUB_PREFIX):]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", rid):
      raise CheckpointError(f"{name}: not a Hub repo id (hf-hub:<owner>/<name>)")
    return rid
  try:
    return pretrained_tags.hub_id(name)
  except KeyError:
    raise CheckpointError(f"unknown pretrained model {name!r}; choose one of "
                          f"{', '.join(pretrained_tags.PRETRAINED_CFGS)} or hf-hub:<owner>/<repo>") from None


def _download(rid: str, filename: str) -> str:
  """The cached file's path; CheckpointError naming why it is not there (offline, unknown repo, no network)."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import constants, errors  # pylint: disable=import-outside-toplevel
  try:
    return huggingface_hub.hf_hub_download(rid, filename)
  except errors.RemoteEntryNotFoundError:
    raise FileNotFoundError(filename) from None
  except errors.LocalEntryNotFoundError:
    offline = constants.HF_HUB_OFFLINE
    raise CheckpointError(
        f"hf-hub:{rid}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
        + (" and HF_HUB_OFFLINE is set" if offline else " and the Hub cannot be reached")
        + ": download it once with network access (or point HF_HUB_CACHE at a cache that holds it)") from None
  except errors.RepositoryNotFoundError:
    raise CheckpointError(f"hf-hub:{rid}: no such repository on the Hugging Face Hub (or it is private)") from None
  except (errors.HfHubHTTPError, OSError) as e:
    raise CheckpointError(f"hf-hub:{rid}: cannot fetch {filename}: {first_line(e)}") from None


def weights_file(name: str) -> str:
  """The local path of a hub name's weights: model.safetensors, else pytorch_model.bin (timm's order)."""
  rid = repo_id(name)
  missing = None
  for filename in WEIGHT_FILES:
    try:
      return _download(rid, filename)
    except FileNotFoundError:
      continue
    except CheckpointError as e:  # not cached offline: the other file may be
      missing = missing or e
  raise missing or CheckpointError(f"hf-hub:{rid}: holds neither {' nor '.join(WEIGHT_FILES)}")


def hub_config(name: str) -> dict:
  """timm's config.json of the repo (architecture, num_classes, pretrained_cfg, label_names); for a released name
  whose repo has none cached, the table's."""
  rid = repo_id(name)
  try:
    with open(_download(rid, CONFIG_FILE)) as f:
      config = json.load(f)
  except (FileNotFoundError, CheckpointError):
    if not rid.startswith("timm/") or rid[len("timm/"):] not in pretrained_tags.PRETRAINED_CFGS:
      raise
    cfg = pretrained_tags.pretrained_cfg(rid[len("timm/"):])
    config = {"architecture": rid[len("timm/"):].split(".")[0], "num_classes": cfg["num_classes"],
              "pretrained_cfg": cfg}
  if "architecture" not in config:
    raise CheckpointError(f"hf-hub:{rid}: {CONFIG_FILE} names no architecture")
  return config


def model_spec(config: dict) -> tuple[str, int, int, float]:
  """(variant, image size, class count, eval crop_pct) of a timm config.json."""
  variant, name_size = parse_model_name(config["architecture"])
  cfg = config.get("pretrained_cfg", {})
  img_size = config.get("model_args", {}).get("img_size") or (
      int(cfg["input_size"][-1]) if "input_size" in cfg else (name_size or 224))
  num_classes = int(config.get("num_classes", cfg.get("num_classes", 1000)))
  _check_eval_transform(config["architecture"], cfg)
  return variant, img_size, num_classes, float(cfg.get("crop_pct", default_crop_pct(variant, img_size)))


def _check_eval_transform(architecture: str, cfg: dict) -> None:
  """The eval transform is timm's with ImageNet's mean and std and bicubic resizing, as every released VOLO uses:
  a config asking for another one is refused rather than evaluated wrongly."""
  ours = pretrained_tags.pretrained_cfg("volo_d1_224")
  for key in ("mean", "std"):
    if key in cfg and [round(float(v), 6) for v in cfg[key]] != [round(v, 6) for v in ours[key]]:
      raise CheckpointError(f"{architecture}: pretrained_cfg {key} {list(cfg[key])} is not ImageNet's "
                            f"{list(ours[key])}, the only normalisation volo_jax's eval transform has")
  if cfg.get("interpolation", "bicubic") != "bicubic":
    raise CheckpointError(f"{architecture}: pretrained_cfg interpolation {cfg['interpolation']!r} is not 'bicubic', "
                          "the only resize volo_jax's eval transform has")


def timm_config(model_name: str, *, img_size: int, num_classes: int, crop_pct: float,
                label_names: list[str] | None = None, num_features: int | None = None) -> dict:
  """A timm config.json for our weights: `timm.create_model("local-dir:DIR", pretrained=True)` (or a Hub repo)
  builds the architecture with the class count and image size and reads the eval transform from it."""
  variant, _ = parse_model_name(model_name)
  cfg = {**pretrained_tags.pretrained_cfg("volo_d1_224"), "input_size": [3, img_size, img_size], "crop_pct": crop_pct,
         "crop_mode": "center", "num_classes": num_classes}
  cfg["mean"], cfg["std"], cfg["classifier"] = list(cfg["mean"]), list(cfg["std"]), list(cfg["classifier"])
  architecture = f"{variant}_{img_size}"
  config = {"architecture": architecture, "num_classes": num_classes, "pretrained_cfg": cfg}
  if f"{architecture}.{pretrained_tags.TAG}" not in pretrained_tags.PRETRAINED_CFGS:  # timm registers those only
    config["architecture"], config["model_args"] = f"{variant}_224", {"img_size": img_size}
  if num_features is not None:
    config["num_features"] = num_features
  if label_names is not None:
    config["label_names"] = list(label_names)
  return config


def load_pretrained(model, name_or_path: str):
  """Fills `model` from a hub name, a PyTorch file, a converted directory or a training workdir: pos_embed is
  resized and the heads stay at init when the class count differs (train/checkpoint.py's load_pretrained)."""
  from volo_jax.train import checkpoint  # pylint: disable=import-outside-toplevel
  return checkpoint.load_pretrained(model, name_or_path)


def create_model(name: str, *, pretrained: bool = False, img_size: int | None = None,
                 num_classes: int | None = None, **kwargs):
  """timm's `create_model`: 'volo_d1', 'volo_d1_384', a released name 'volo_d1_224.sail_in1k' or
  'hf-hub:<owner>/<repo>'; `pretrained=True` loads the weights (a bare variant name: its released weights at that
  size, else at 224 with pos_embed resized)."""
  if name.startswith(HUB_PREFIX) or "." in name:
    variant, size, classes, _ = model_spec(hub_config(name))
    source = name
  else:
    variant, name_size = parse_model_name(name)
    size, classes = name_size or 224, 1000
    source = f"{variant}_{size}.{pretrained_tags.TAG}"
    if source not in pretrained_tags.PRETRAINED_CFGS:
      source = f"{variant}_224.{pretrained_tags.TAG}"
    if pretrained and source not in pretrained_tags.PRETRAINED_CFGS:
      raise CheckpointError(f"{name}: no released weights; choose one of {', '.join(pretrained_tags.PRETRAINED_CFGS)}")
  model = _create_model(variant, img_size=img_size or size, num_classes=classes if num_classes is None else num_classes,
                        **kwargs)
  if pretrained:
    load_pretrained(model, source if source.startswith(HUB_PREFIX) else f"{HUB_PREFIX}{repo_id(source)}")
  return model
