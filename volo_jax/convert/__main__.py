"""Command-line weight conversion.

  python -m volo_jax.convert torch2flax SRC.pth.tar OUT_DIR --model volo_d1 --img-size 224 [--num-classes N] [--ema]
                                      [--scan-blocks]
  python -m volo_jax.convert flax2torch CKPT_DIR OUT.pth --model volo_d1 --img-size 224
  python -m volo_jax.convert export WORKDIR_OR_DIR OUT_DIR --format timm

--scan-blocks writes the stacked layout of `create_model(..., scan_blocks=True)`; flax2torch reads either.
`export --format timm` writes model.safetensors and timm's config.json (architecture, num_classes, label_names,
pretrained_cfg) from a training workdir, a converted directory or a Hub name: `timm.create_model("local-dir:OUT_DIR",
pretrained=True)` loads it (or upload OUT_DIR as a Hub repo).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from volo_jax import sources
from volo_jax.convert.flax_io import read_model_json, restore_weights, save_model_checkpoint
from volo_jax.convert.mapping import export_torch_weights, load_torch_weights
from volo_jax.errors import CheckpointError
from volo_jax.hub import timm_config
from volo_jax.models import VARIANTS, create_model, parse_model_name

TIMM_VARIANTS = ("volo_d1", "volo_d2", "volo_d3", "volo_d4", "volo_d5")  # volo_tiny is ours


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="direction", required=True)
  to_flax = sub.add_parser("torch2flax", help="PyTorch .pth.tar/.pth/.bin/.safetensors → orbax directory")
  to_flax.add_argument("src")
  to_flax.add_argument("out_dir")
  to_flax.add_argument("--num-classes", type=int, default=1000)
  to_flax.add_argument("--ema", action="store_true", help="take the checkpoint's state_dict_ema")
  to_flax.add_argument("--non-strict", action="store_true", help="ignore checkpoint tensors the model lacks")
  to_flax.add_argument("--scan-blocks", action="store_true", help="save stacked blocks (scan_blocks=True layout)")
  to_torch = sub.add_parser("flax2torch", help="orbax directory → .pth or .safetensors state dict")
  to_torch.add_argument("ckpt_dir")
  to_torch.add_argument("out")
  for p in (to_flax, to_torch):
    p.add_argument("--model", required=True, help="volo_d1 … volo_d5")
    p.add_argument("--img-size", type=int, default=224)
  export = sub.add_parser("export", help="training workdir / converted dir / Hub name → a timm model directory")
  export.add_argument("src")
  export.add_argument("out_dir")
  export.add_argument("--format", choices=["timm"], default="timm")
  return parser


def export_timm(src: str, out_dir: str) -> None:
  """OUT_DIR/model.safetensors + config.json, written in a temporary sibling and renamed when complete."""
  source = sources.describe(src)
  if source.model not in TIMM_VARIANTS:
    raise CheckpointError(f"{src}: timm has no {source.model}; export a volo_d1 … volo_d5 model")
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise CheckpointError(f"{out_dir}: already exists; choose a new output directory")
  model = sources.build(source)
  config = timm_config(source.model, img_size=source.img_size, num_classes=source.num_classes,
                       crop_pct=source.crop_pct, label_names=source.label_names,
                       num_features=VARIANTS[source.model].embed_dims[-1])
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
  try:
    export_torch_weights(model, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.direction == "export":
      export_timm(args.src, args.out_dir)
      print(f"wrote {args.out_dir}")
      return 0
    parse_model_name(args.model)
    if args.direction == "torch2flax":
      model = create_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                           scan_blocks=args.scan_blocks)
      report = load_torch_weights(model, args.src, use_ema=args.ema, strict=not args.non_strict)
      save_model_checkpoint(model, args.out_dir, model_name=args.model, img_size=args.img_size)
      print(report)
      print(f"wrote {args.out_dir}")
    else:
      meta = read_model_json(args.ckpt_dir)
      if (parse_model_name(meta["model"])[0], meta["img_size"]) != (parse_model_name(args.model)[0],
                                                                    args.img_size):
        raise CheckpointError(f"{args.ckpt_dir} holds {meta['model']} at {meta['img_size']}, "
                              f"not {args.model} at {args.img_size}")
      model = create_model(args.model, img_size=args.img_size, num_classes=meta["num_classes"],
                           scan_blocks=meta.get("scan_blocks", False))
      restore_weights(model, args.ckpt_dir)
      export_torch_weights(model, args.out)
      print(f"wrote {args.out}")
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
