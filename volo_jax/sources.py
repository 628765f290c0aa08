"""What a weights argument names, and the model it makes: a training workdir, a `convert torch2flax` directory, a
Hub name or a PyTorch file, each with its class count, image size, eval crop_pct and class names, so that
`predict`, `convert export` and `export` use a fine-tuned model as they use the released ones."""

import dataclasses
import json
import os

from volo_jax import hub
from volo_jax.convert import flax_io
from volo_jax.convert.mapping import load_torch_weights
from volo_jax.errors import CheckpointError
from volo_jax.models import create_model, default_crop_pct, parse_model_name

WORKDIR_CONFIG = "config.json"  # train/checkpoint.py's CONFIG_JSON: the resolved config of a training run


@dataclasses.dataclass(frozen=True)
class Source:
  """A model's description: enough to build it, pre-process its input and name its outputs."""
  weights: str  # what load_pretrained reads
  model: str  # variant, e.g. volo_d1
  img_size: int
  num_classes: int
  crop_pct: float
  label_names: list[str] | None  # None: unknown (ImageNet's for 1000 classes)


def _workdir_config(path: str) -> dict | None:
  file = os.path.join(path, WORKDIR_CONFIG)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    config = json.load(f)
  return config if "model" in config and "data" in config else None


def _dataset_names(data: dict, num_classes: int) -> list[str] | None:
  """The ClassLabel names of the run's TFDS dataset, when it is still where the run read it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from volo_jax.data.digits import VoloDigits  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    builder = tfds.builder(data["dataset"], data_dir=data.get("data_dir") or None)
    names = builder.info.features["label"].names
  except Exception:  # pylint: disable=broad-except  (a dataset moved or gone: predict shows class indices)
    return None
  return list(names) if len(names) == num_classes else None


def describe(weights: str | None, model_name: str | None = None, img_size: int | None = None) -> Source:
  """The Source of `weights` (a workdir, converted dir, Hub name or file; None: `model_name` is a Hub name).
  A file carries no architecture: `model_name` (and the size in it or `img_size`) says what it holds."""
  if weights is None:
    if model_name is None or not (hub.is_hub_name(model_name) or "." in model_name):
      raise CheckpointError("give --weights, or a Hub name as --model (e.g. volo_d1_224.sail_in1k)")
    weights = model_name if model_name.startswith(hub.HUB_PREFIX) else f"{hub.HUB_PREFIX}{hub.repo_id(model_name)}"
  if hub.is_hub_name(weights):
    config = hub.hub_config(weights)
    variant, size, classes, crop_pct = hub.model_spec(config)
    names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    return Source(weights, variant, size, classes, crop_pct, names)
  config = _workdir_config(weights)
  if config is not None:
    m = config["model"]
    names = (config.get("label_names") or _dataset_names(config["data"], m["num_classes"]))
    return Source(weights, m["name"], m["img_size"], m["num_classes"], config["data"].get("crop_pct")
                  or default_crop_pct(m["name"], m["img_size"]), names)
  if flax_io.is_model_checkpoint(weights):
    meta = flax_io.read_model_json(weights)
    variant, _ = parse_model_name(meta["model"])
    return Source(weights, variant, meta["img_size"], meta["num_classes"],
                  default_crop_pct(variant, meta["img_size"]), meta.get("label_names"))
  if os.path.isdir(weights):
    raise CheckpointError(f"{weights}: neither a training workdir, a converted weights directory nor a file")
  if not os.path.isfile(weights):
    raise CheckpointError(f"{weights}: no such file or directory (nor a Hub name: hf-hub:<owner>/<repo>)")
  if model_name is None:
    raise CheckpointError(f"{weights}: a weights file names no architecture; give --model (e.g. volo_d1_224)")
  variant, name_size = parse_model_name(model_name)
  size = img_size or name_size or 224
  return Source(weights, variant, size, 1000, default_crop_pct(variant, size), None)


def build(source: Source, img_size: int | None = None, **kwargs):
  """The model of `source` with its weights (at `img_size` if given: pos_embed resized)."""
  weights = hub.weights_file(source.weights) if hub.is_hub_name(source.weights) else source.weights  # fetch first
  model = create_model(source.model, img_size=img_size or source.img_size, num_classes=source.num_classes,
                       **kwargs)
  if os.path.isfile(weights):  # a file: every tensor must fit (no head reset)
    load_torch_weights(model, weights)
  else:
    hub.load_pretrained(model, weights)
  return model
