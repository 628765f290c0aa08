"""The prepared token-label set (written by `python -m volo_jax.token_labels prepare`), read by the train pipeline.

On disk, in one directory:
  meta.json                          map size S, top-k, class count, shard list
  names-SSSSS-of-NNNNN.txt           the ImageNet file name of each row (`n01440764_10026.JPEG`), sorted
  scores-SSSSS-of-NNNNN.npy          float16 (n, k, S, S): the annotator's top-k logits per location, descending
  classes-SSSSS-of-NNNNN.npy         int16 (n, k, S, S): their class indices
The arrays are memory-mapped: a host pages in only the rows its examples touch, so every host can open the whole
set whatever its share of the TFDS split. Rows are joined to TFDS examples by their `file_name` feature.
"""

import json
import os

import numpy as np

from volo_jax.errors import ConfigError

META = "meta.json"
FORMAT = "volo_jax token labels v1"


def shard_files(index: int, count: int) -> dict:
  suffix = f"{index:05d}-of-{count:05d}"
  return {"names": f"names-{suffix}.txt", "scores": f"scores-{suffix}.npy", "classes": f"classes-{suffix}.npy"}


def write_shard(directory: str, index: int, count: int, names: list[str], scores: np.ndarray,
                classes: np.ndarray) -> dict:
  """Writes one shard; returns its meta.json entry."""
  files = shard_files(index, count)
  with open(os.path.join(directory, files["names"]), "w") as f:
    f.write("".join(name + "\n" for name in names))
  np.save(os.path.join(directory, files["scores"]), scores.astype(np.float16))
  np.save(os.path.join(directory, files["classes"]), classes.astype(np.int16))
  return dict(files, count=len(names))


def write_meta(directory: str, *, map_size: int, topk: int, num_classes: int, shards: list[dict]) -> None:
  meta = {"format": FORMAT, "map_size": map_size, "topk": topk, "num_classes": num_classes,
          "num_maps": sum(s["count"] for s in shards), "shards": shards}
  with open(os.path.join(directory, META), "w") as f:
    json.dump(meta, f, indent=1)


def read_meta(directory: str) -> dict:
  """The directory's meta.json; ConfigError when it is missing or of another format."""
  path = os.path.join(directory, META)
  if not os.path.isfile(path):
    raise ConfigError(f"no prepared token labels in {directory!r} ({META} missing): run "
                      "`python -m volo_jax.token_labels prepare` (README, Token labeling)")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ConfigError(f"{path} is not a {FORMAT!r} directory")
  return meta


class LabelStore:
  """file name → (scores (k, S, S) float16, classes (k, S, S) int16) over a prepared directory."""

  def __init__(self, directory: str):
    self.meta = read_meta(directory)
    self.map_size, self.topk = self.meta["map_size"], self.meta["topk"]
    self.scores, self.classes, self.names, self.rows = [], [], [], {}
    for shard, entry in enumerate(self.meta["shards"]):
      with open(os.path.join(directory, entry["names"])) as f:
        names = f.read().split()
      self.scores.append(np.load(os.path.join(directory, entry["scores"]), mmap_mode="r"))
      self.classes.append(np.load(os.path.join(directory, entry["classes"]), mmap_mode="r"))
      self.names.append(names)
      self.rows.update((name, (shard, row)) for row, name in enumerate(names))

  def __len__(self) -> int:
    return len(self.rows)

  def lookup(self, file_name) -> tuple[np.ndarray, np.ndarray]:
    name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    if name not in self.rows:
      raise KeyError(f"no token-label map for training image {name!r}: run "
                     "`python -m volo_jax.token_labels verify` for the full list of missing entries")
    shard, row = self.rows[name]
    return np.array(self.scores[shard][row]), np.array(self.classes[shard][row])

  def tf_lookup(self, file_name):
    """The lookup as a tf.data op (a numpy function: the arrays stay memory-mapped, nothing is copied to TF)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    scores, classes = tf.numpy_function(self.lookup, [file_name], [tf.float16, tf.int16], stateful=False)
    shape = (self.topk, self.map_size, self.map_size)
    return tf.ensure_shape(scores, shape), tf.ensure_shape(classes, shape)
