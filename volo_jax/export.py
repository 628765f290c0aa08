"""The eval forward as a serialised `jax.export` artifact (StableHLO with the weights inside) for serving: it runs
with `jax.export.deserialize(...).call(images)` in any JAX process, without this package.

  python -m volo_jax.export WEIGHTS OUT.jaxexport [--model NAME] [--platforms cpu,cuda,tpu] [--batch symbolic|N]

WEIGHTS is a training workdir, a converted directory, a Hub name or (with --model) a weights file, as for
`predict`. The input is (batch, H, W, 3) float32, ImageNet-normalised after the eval transform; the output the
logits. `--batch symbolic` (default) leaves the batch size free. OUT.jaxexport.json records the image size,
crop_pct, normalisation and class names. The plain model is exported (not the CPU-tuned kernels).
"""

import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx

from volo_jax import sources
from volo_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from volo_jax.errors import CheckpointError, first_line

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def export_forward(model, img_size: int, *, platforms: tuple[str, ...] = ("cpu",), batch: str = "symbolic"):
  """The `jax.export.Exported` of `model`'s eval forward on (batch, img_size, img_size, 3) float32 images."""
  model.eval()
  graphdef, state = nnx.split(model)

  def forward(images):
    return nnx.merge(graphdef, state)(images)

  size = jax.export.symbolic_shape("b")[0] if batch == "symbolic" else int(batch)
  spec = jax.ShapeDtypeStruct((size, img_size, img_size, 3), jnp.float32)
  return jax.export.export(jax.jit(forward), platforms=platforms)(spec)


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("weights")
  parser.add_argument("out")
  parser.add_argument("--model", default=None, help="the architecture of a weights file (e.g. volo_d1_224)")
  parser.add_argument("--platforms", default="cpu", help=f"comma-separated, of {', '.join(PLATFORMS)}")
  parser.add_argument("--batch", default="symbolic", help="'symbolic' or a fixed batch size")
  args = parser.parse_args(argv)
  try:
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
      raise ValueError(f"--platforms {args.platforms}: choose from {', '.join(PLATFORMS)}")
    if args.batch != "symbolic" and not (args.batch.isdigit() and int(args.batch) > 0):
      raise ValueError(f"--batch {args.batch}: 'symbolic' or a positive integer")
    meta_path = args.out + ".json"
    for path in (args.out, meta_path):
      if os.path.exists(path):
        raise ValueError(f"{path}: already exists; choose a new output file")
    source = sources.describe(args.weights, args.model)
    model = sources.build(source)
    exported = export_forward(model, source.img_size, platforms=platforms, batch=args.batch)
  except (CheckpointError, ValueError) as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    return 2
  meta = {"model": source.model, "img_size": source.img_size, "num_classes": source.num_classes,
          "crop_pct": source.crop_pct, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
          "label_names": source.label_names, "platforms": list(platforms), "batch": args.batch}
  _write_atomically(args.out, bytes(exported.serialize()))
  _write_atomically(meta_path, json.dumps(meta, indent=2).encode())
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB) and {meta_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
