"""Our own weights-only checkpoint: an orbax checkpoint of the model's Param/BatchStat state plus a small JSON
that names the architecture (and the block layout, `scan_blocks`), so `flax2torch`, `predict` and the trainer's
`init_from` can rebuild the model. Either layout restores into a model of either layout."""

import json
import os
import shutil
import tempfile

import orbax.checkpoint as ocp
from flax import nnx

from volo_jax.convert import mapping
from volo_jax.errors import CheckpointError, first_line
from volo_jax.models import VOLO, create_model

MODEL_JSON = "model.json"
WEIGHTS_DIR = "weights"


def _weights(model: VOLO):
  return nnx.state(model, (nnx.Param, nnx.BatchStat))


def is_model_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MODEL_JSON))


def save_model_checkpoint(model: VOLO, out_dir: str, *, model_name: str, img_size: int) -> None:
  """Writes out_dir atomically (a temporary sibling renamed into place); refuses an existing out_dir."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, WEIGHTS_DIR), _weights(model).to_pure_dict())
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump({"model": model_name, "img_size": img_size, "num_classes": model.num_classes,
                 "scan_blocks": model.scan_blocks}, f, indent=2)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def read_model_json(path: str) -> dict:
  if not is_model_checkpoint(path):
    raise CheckpointError(f"{path}: not a volo_jax weights checkpoint (no {MODEL_JSON})")
  with open(os.path.join(path, MODEL_JSON)) as f:
    return json.load(f)


def load_model_checkpoint(path: str, **model_kwargs) -> VOLO:
  """Rebuilds the model named in path/model.json (in its saved block layout unless `scan_blocks` is given) and
  restores its weights."""
  meta = read_model_json(path)
  model_kwargs = {"scan_blocks": meta.get("scan_blocks", False), **model_kwargs}
  model = create_model(meta["model"], img_size=meta["img_size"], num_classes=meta["num_classes"], **model_kwargs)
  restore_weights(model, path)
  return model


def restore_weights(model: VOLO, path: str) -> None:
  """Restores path's weights into an already-built model of the same architecture; a model in the other block
  layout gets them through the PyTorch names (stacked ↔ per-layer)."""
  if read_model_json(path).get("scan_blocks", False) != model.scan_blocks:
    source = load_model_checkpoint(path)
    if source.num_classes != model.num_classes or source.pos_embed.shape != model.pos_embed.shape:
      raise CheckpointError(f"{path}: holds another image size or class count than this model")
    mapping.load_state_dict(model, mapping.state_dict(source))
    return
  target = _weights(model).to_pure_dict()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(os.path.join(os.path.abspath(path), WEIGHTS_DIR), target)
  except Exception as e:  # orbax raises many types for truncated or mismatched trees
    raise CheckpointError(f"{path}: cannot restore weights into this model: {first_line(e)}") from e
  nnx.update(model, restored)
