"""`python -m volo_jax.token_labels prepare|verify`: the released token-label maps → our memory-mapped shards.

The release (TokenLabeling's NFNet-F6 maps) is one `torch.save` per training image at
`<label-dir>/<wnid>/<image stem>.pt`: float16 [2, k, S, S], plane 0 the top-k logits per location, plane 1 their
class indices (float16, exact below 2048). `prepare` converts it (torch needed here only, never in training);
`verify` lists missing, extra and corrupt entries against the TFDS training split.

  python -m volo_jax.token_labels prepare --label-dir label_top5_train_nfnet --out DIR [--num-shards 64]
  python -m volo_jax.token_labels verify --labels DIR --data-dir TFDS_DIR [--dataset imagenet2012]
"""

import argparse
import collections
import glob
import json
import multiprocessing
import os
import sys

import numpy as np

from volo_jax.data import token_label_store
from volo_jax.errors import ConfigError

IMAGE_SUFFIX = ".JPEG"  # TFDS imagenet2012's file_name: n01440764_10026.JPEG


def check_map(scores: np.ndarray, classes: np.ndarray, num_classes: int) -> str | None:
  """Why a (k, S, S) scores/classes pair is corrupt, or None."""
  if scores.ndim != 3 or scores.shape[1] != scores.shape[2] or classes.shape != scores.shape:
    return f"shape {scores.shape}/{classes.shape} is not (k, S, S)"
  if not np.isfinite(scores).all():
    return "non-finite scores"
  if classes.min() < 0 or classes.max() >= num_classes:
    return f"class index outside [0, {num_classes})"
  return None


def _load_pt(path: str):
  """One released file → (scores float16, classes int16, None) or (None, None, reason)."""
  import torch  # pylint: disable=import-outside-toplevel
  try:
    data = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (any unreadable file is reported, not fatal)
    return None, None, f"unreadable: {type(e).__name__}: {str(e)[:200]}"
  if not isinstance(data, torch.Tensor) or data.ndim != 4 or data.shape[0] != 2:
    return None, None, f"not a [2, k, S, S] tensor: {type(data).__name__} {getattr(data, 'shape', '')}"
  data = data.float().numpy()
  scores, classes = data[0], data[1]
  if not np.array_equal(classes, np.round(classes)):
    return None, None, "non-integer class indices"
  return scores.astype(np.float16), classes.astype(np.int16), None


def _load_checked(args):
  path, num_classes = args
  scores, classes, reason = _load_pt(path)
  if reason is None:
    reason = check_map(scores, classes, num_classes)
  return scores, classes, reason


def prepare(label_dir: str, out: str, num_shards: int, num_classes: int = 1000, workers: int = 1) -> dict:
  """Converts every `<wnid>/<stem>.pt`; corrupt files are skipped and reported. Returns a summary."""
  import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (fail early without torch)
  paths = sorted(glob.glob(os.path.join(label_dir, "*", "*.pt")))
  if not paths:
    raise FileNotFoundError(f"no <wnid>/<stem>.pt files under {label_dir!r}")
  os.makedirs(out, exist_ok=True)
  num_shards = max(1, min(num_shards, len(paths)))
  bounds = np.linspace(0, len(paths), num_shards + 1).astype(int)
  shards, corrupt, map_shape = [], {}, None
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
  try:
    for index in range(num_shards):
      part = paths[bounds[index]:bounds[index + 1]]
      jobs = [(p, num_classes) for p in part]
      loaded = pool.imap(_load_checked, jobs, chunksize=64) if pool else map(_load_checked, jobs)
      names, scores, classes = [], [], []
      for path, (s, c, reason) in zip(part, loaded):
        if reason is None and map_shape not in (None, s.shape):
          reason = f"shape {s.shape} differs from the set's {map_shape}"
        if reason is not None:
          corrupt[path] = reason
          continue
        map_shape = s.shape
        names.append(os.path.splitext(os.path.basename(path))[0] + IMAGE_SUFFIX)
        scores.append(s)
        classes.append(c)
      if map_shape is None:
        continue
      empty = np.zeros((0, *map_shape))
      shards.append(token_label_store.write_shard(out, index, num_shards, names,
                                            np.stack(scores) if scores else empty,
                                            np.stack(classes) if classes else empty))
  finally:
    if pool:
      pool.close()
  if map_shape is None:
    raise ValueError(f"every one of the {len(paths)} files under {label_dir!r} is corrupt")
  token_label_store.write_meta(out, map_size=map_shape[1], topk=map_shape[0], num_classes=num_classes,
                               shards=shards)
  return {"maps": sum(s["count"] for s in shards), "map_shape": list(map_shape), "shards": len(shards),
          "corrupt": corrupt}


def _tfds_file_names(dataset: str, data_dir: str | None, split: str) -> list[str]:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ds = tfds.builder(dataset, data_dir=data_dir).as_dataset(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [name.decode() for name in ds.map(lambda ex: ex["file_name"]).as_numpy_iterator()]


def verify(labels: str, dataset: str = "imagenet2012", data_dir: str | None = None, split: str = "train",
           file_names: list[str] | None = None, chunk: int = 4096) -> dict:
  """{'missing': training images without a map, 'extra': maps of no training image, 'corrupt': {name: why},
  'duplicates': names listed twice}; file_names replaces the TFDS read (tests)."""
  store = token_label_store.LabelStore(labels)
  num_classes = store.meta["num_classes"]
  corrupt, listed = {}, []
  for names, scores, classes in zip(store.names, store.scores, store.classes):
    listed += names
    if len(names) != len(scores) or len(names) != len(classes):
      corrupt.update({n: "shard arrays and name list differ in length" for n in names})
      continue
    for start in range(0, len(names), chunk):
      s = np.asarray(scores[start:start + chunk], np.float32)
      c = np.asarray(classes[start:start + chunk])
      bad = ~np.isfinite(s).all(axis=(1, 2, 3)) | (c < 0).any(axis=(1, 2, 3)) | (c >= num_classes).any(
          axis=(1, 2, 3))
      corrupt.update({names[start + i]: "non-finite score or class index out of range"
                      for i in np.flatnonzero(bad)})
  duplicates = sorted(n for n, times in collections.Counter(listed).items() if times > 1)
  expected = set(file_names if file_names is not None else _tfds_file_names(dataset, data_dir, split))
  return {"maps": len(store), "images": len(expected), "missing": sorted(expected - store.rows.keys()),
          "extra": sorted(store.rows.keys() - expected), "corrupt": corrupt, "duplicates": duplicates}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.token_labels", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="released .pt maps → memory-mapped shards")
  p.add_argument("--label-dir", required=True, help="the extracted release: <wnid>/<stem>.pt")
  p.add_argument("--out", required=True)
  p.add_argument("--num-shards", type=int, default=64)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  v = sub.add_parser("verify", help="missing / extra / corrupt entries against the TFDS training split")
  v.add_argument("--labels", required=True, help="a prepared directory")
  v.add_argument("--dataset", default="imagenet2012")
  v.add_argument("--data-dir", default=None, help="TFDS data_dir")
  v.add_argument("--split", default="train")
  args = parser.parse_args(argv)
  try:
    return _run(args)
  except ConfigError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2


def _run(args) -> int:
  if args.command == "prepare":
    summary = prepare(args.label_dir, args.out, args.num_shards, args.num_classes, args.workers)
    print(json.dumps(summary, indent=1))
    return 1 if summary["corrupt"] else 0
  report = verify(args.labels, args.dataset, args.data_dir, args.split)
  counts = {k: len(report[k]) for k in ("missing", "extra", "corrupt", "duplicates")}
  print(json.dumps({"maps": report["maps"], "images": report["images"], **counts}))
  for kind in ("missing", "extra", "duplicates"):
    for name in report[kind][:20]:
      print(f"{kind}: {name}")
  for name, reason in list(report["corrupt"].items())[:20]:
    print(f"corrupt: {name}: {reason}")
  return 1 if any(counts.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
