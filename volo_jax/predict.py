"""Top-5 ImageNet predictions for image files.

  python -m volo_jax.predict --model volo_d1 --weights SRC IMAGE [IMAGE ...]

SRC is an official/timm .pth(.tar), a .safetensors file, or a directory written by `volo_jax.convert torch2flax`.
"""

import argparse
import importlib.util
import os
import sys

import jax
import numpy as np
import tensorflow as tf
from flax import nnx

from volo_jax import cpu
from volo_jax.convert.flax_io import is_model_checkpoint, restore_weights
from volo_jax.convert.mapping import load_torch_weights
from volo_jax.convert.torch_io import CheckpointError
from volo_jax.data.transforms import eval_transform
from volo_jax.models import create_model, default_crop_pct, parse_model_name


def imagenet_class_names() -> list[str]:
  """WordNet ids in class-index order (TFDS ships them), with timm's lemma text when timm is installed.

  timm's file is read without importing timm: importing torchvision after TensorFlow crashes some builds.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  wnids = tfds.features.ClassLabel(names_file=tfds.core.tfds_path("datasets/imagenet2012/labels.txt")).names
  timm_spec = importlib.util.find_spec("timm")
  lemma_file = (os.path.join(os.path.dirname(timm_spec.origin), "data", "_info", "imagenet_synset_to_lemma.txt")
                if timm_spec else "")
  if not os.path.isfile(lemma_file):
    return wnids
  with open(lemma_file) as f:
    lemmas = dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
  return [lemmas.get(wnid, wnid) for wnid in wnids]


def load_image(path: str, img_size: int, crop_pct: float) -> np.ndarray:
  data = tf.io.read_file(path)
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return eval_transform(image, img_size, crop_pct).numpy()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True)
  parser.add_argument("--weights", required=True)
  parser.add_argument("--img-size", type=int, default=None)
  parser.add_argument("--crop-pct", type=float, default=None)
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  try:
    variant, name_size = parse_model_name(args.model)
    img_size = args.img_size or name_size or 224
    model = create_model(variant, img_size=img_size)
    if is_model_checkpoint(args.weights):
      restore_weights(model, args.weights)
    else:
      load_torch_weights(model, args.weights)
    batch = np.stack([load_image(p, img_size, args.crop_pct or default_crop_pct(variant, img_size))
                      for p in args.images])
  except (CheckpointError, ValueError, tf.errors.OpError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  model.eval()
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:  # XLA:CPU's tuned kernels and compile options; plain autodiff and jax.jit elsewhere
    cpu.use_cpu_kernels(model, cpu.dot_library("auto"))
  graphdef, state = nnx.split(model)
  forward = (cpu.jit if on_cpu else jax.jit)(lambda state, x: nnx.merge(graphdef, state)(x))
  probs = np.asarray(jax.nn.softmax(forward(state, batch), axis=-1))
  names = imagenet_class_names()
  for path, p in zip(args.images, probs):
    print(path)
    for idx in np.argsort(-p)[:args.top]:
      print(f"  {p[idx]:6.2%}  {idx:4d}  {names[idx]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
