"""A folder of images as a TFDS dataset, written once, so that the trainer reads it like any other TFDS dataset.

  python -m volo_jax.data.folder IMAGES_DIR --name my_flowers --data-dir DATA [--val-fraction 0.1] [--seed 0]

IMAGES_DIR is `<class>/<image>` (a stratified `--val-fraction` becomes the validation split) or
`{train,val}/<class>/<image>` with timm's split names (train/training; val/valid/validation/eval/evaluation).
As timm's folder reader: images are found at any depth, a label is the image's directory relative to the split
root (`/` → `_`), classes are in natural sort order. The encoded bytes are stored unchanged (JPEG, PNG, GIF, BMP),
the class names in the ClassLabel, the relative path as `file_name`. Images that do not decode are listed and
left out. Then: `--config.data.dataset=NAME --config.data.data_dir=DATA` (splits `train` and `validation`).
"""

import argparse
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from volo_jax.errors import first_line

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "eval", "evaluation")
VERSION = "1.0.0"


class FolderError(ValueError):
  """Bad input: the message is the one line the CLI prints."""


def natural_key(text: str) -> list:
  """timm's natural sort key: digit runs compare as numbers, the rest case-insensitively."""
  return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", text.lower())]


def find_images(root: str) -> list[tuple[str, str]]:
  """(path relative to root, label) of every image under root, in natural order of the path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort(key=natural_key)
    rel_dir = os.path.relpath(dirpath, root)
    for name in filenames:
      if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and rel_dir != ".":
        found.append((os.path.join(rel_dir, name), rel_dir.replace(os.path.sep, "_")))
  return sorted(found, key=lambda item: natural_key(item[0]))


def _split_dir(root: str, names: tuple[str, ...]) -> str | None:
  for name in names:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  return None


def plan_splits(root: str, val_fraction: float, seed: int) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """Class names and, per split, (path relative to root, class index): the folder's own train/val split, or a
  stratified random split of each class (at least one validation image per class with two or more)."""
  if not os.path.isdir(root):
    raise FolderError(f"{root}: no such directory")
  train_dir, val_dir = _split_dir(root, TRAIN_NAMES), _split_dir(root, VAL_NAMES)
  if train_dir and val_dir:
    found = {split: [(os.path.relpath(os.path.join(d, p), root), label) for p, label in find_images(d)]
             for split, d in (("train", train_dir), ("validation", val_dir))}
    classes = sorted({label for _, label in found["train"]}, key=natural_key)
    unknown = sorted({label for _, label in found["validation"]} - set(classes), key=natural_key)
    if unknown:
      raise FolderError(f"{val_dir}: classes not in {train_dir}: {', '.join(unknown[:5])}")
  else:
    if not 0.0 < val_fraction < 1.0:
      raise FolderError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    images = find_images(train_dir or root)  # a train folder alone is split like a folder of classes
    if train_dir:
      images = [(os.path.relpath(os.path.join(train_dir, p), root), label) for p, label in images]
    classes = sorted({label for _, label in images}, key=natural_key)
    rng = np.random.default_rng(seed)
    found = {"train": [], "validation": []}
    for label in classes:
      members = [item for item in images if item[1] == label]
      order = rng.permutation(len(members))
      n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
      for rank, i in enumerate(order):
        found["validation" if rank < n_val else "train"].append(members[i])
    for split in found:
      found[split].sort(key=lambda item: natural_key(item[0]))
  if len(classes) < 2:
    raise FolderError(f"{root}: {len(classes)} class(es) with images ({', '.join(IMAGE_EXTENSIONS)}); a classifier "
                      "needs at least 2 class directories")
  index = {label: i for i, label in enumerate(classes)}
  return classes, {split: [(path, index[label]) for path, label in items] for split, items in found.items()}


def _decodes(data: bytes) -> bool:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.io.decode_image(data, channels=3, expand_animations=False)
    return True
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
    return False


def write_dataset(root: str, name: str, data_dir: str, *, val_fraction: float = 0.1, seed: int = 0,
                  log=print) -> dict:
  """Writes DATA_DIR/NAME/1.0.0 (built in a temporary sibling, renamed when complete); returns the split sizes,
  the class names and the images left out."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise FolderError(f"--name {name!r}: use lower case letters, digits and _ (a TFDS dataset name)")
  if name in tfds.list_builders(with_community_datasets=False):
    raise FolderError(f"--name {name!r}: a TFDS catalog dataset of that name exists; choose another")
  data_dir = os.path.abspath(data_dir)
  out = os.path.join(data_dir, name)
  if os.path.exists(out):
    raise FolderError(f"{out}: already exists; choose another --name or --data-dir")
  classes, splits = plan_splits(root, val_fraction, seed)
  examples, left_out = {}, []
  for split, items in splits.items():
    examples[split] = []
    for i, (path, label) in enumerate(items):
      with open(os.path.join(root, path), "rb") as f:
        data = f.read()
      if not _decodes(data):
        left_out.append(path)
        continue
      examples[split].append((i, {"image": data, "label": label, "file_name": path}))
  for path in left_out:
    log(f"left out (does not decode): {path}")
  if not examples["train"]:
    raise FolderError(f"{root}: no training image decodes")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=classes),
      "file_name": tfds.features.Text(),
  })
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=data_dir)
  try:
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=VERSION, features=features, split_datasets={k: v for k, v in examples.items() if v},
        data_dir=tmp, description=f"Images of {os.path.abspath(root)}, written by volo_jax.data.folder.",
        disable_shuffling=False)
    os.replace(os.path.join(tmp, name), out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"classes": classes, "sizes": {k: len(v) for k, v in examples.items()}, "left_out": left_out}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.data.folder", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("images_dir")
  parser.add_argument("--name", required=True, help="the TFDS dataset name (--config.data.dataset)")
  parser.add_argument("--data-dir", required=True, help="the TFDS data_dir to write into (--config.data.data_dir)")
  parser.add_argument("--val-fraction", type=float, default=0.1, help="per class, when there is no val folder")
  parser.add_argument("--seed", type=int, default=0, help="of the train/validation split")
  args = parser.parse_args(argv)
  try:
    result = write_dataset(args.images_dir, args.name, args.data_dir, val_fraction=args.val_fraction,
                           seed=args.seed)
  except (FolderError, OSError) as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{split} {n}" for split, n in result["sizes"].items())
  print(f"wrote {os.path.join(os.path.abspath(args.data_dir), args.name)}: {len(result['classes'])} classes, "
        f"{sizes} images, {len(result['left_out'])} left out")
  return 0


if __name__ == "__main__":
  sys.exit(main())
