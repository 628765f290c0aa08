"""Top-5 predictions for image files, with the class names of the weights.

  python -m volo_jax.predict --model volo_d1_224.sail_in1k IMAGE [IMAGE ...]        # released weights by name
  python -m volo_jax.predict --weights WORKDIR_OR_DIR IMAGE [IMAGE ...]              # a fine-tuned model
  python -m volo_jax.predict --model volo_d1 --weights SRC IMAGE [IMAGE ...]         # a weights file

--model is a Hub name (hf-hub:<owner>/<repo>, volo_d1_224.sail_in1k: fetched into the Hugging Face cache) or, with
a weights file, its architecture. --weights is a training workdir (class count, image size, crop_pct and the
dataset's class names from its config.json), a `volo_jax.convert torch2flax` directory, or an official/timm
.pth(.tar) or .safetensors file (ImageNet's 1000 classes).
"""

import argparse
import importlib.util
import os
import sys

import jax
import numpy as np
import tensorflow as tf
from flax import nnx

from volo_jax import cpu, sources
from volo_jax.errors import first_line
from volo_jax.convert.torch_io import CheckpointError
from volo_jax.data.transforms import eval_transform


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


def class_names(source: sources.Source) -> list[str]:
  """The weights' own names; ImageNet's for 1000 classes without names; else the class indices."""
  if source.label_names:
    return list(source.label_names)
  if source.num_classes == 1000:
    return imagenet_class_names()
  return [f"class {i}" for i in range(source.num_classes)]


def load_image(path: str, img_size: int, crop_pct: float) -> np.ndarray:
  data = tf.io.read_file(path)
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return eval_transform(image, img_size, crop_pct).numpy()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.predict", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default=None, help="a Hub name, or the architecture of a weights file")
  parser.add_argument("--weights", default=None, help="a training workdir, a converted directory or a file")
  parser.add_argument("--img-size", type=int, default=None)
  parser.add_argument("--crop-pct", type=float, default=None)
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(argv)
  try:
    source = sources.describe(args.weights, args.model, args.img_size)
    img_size = args.img_size or source.img_size
    for path in args.images:
      if not os.path.isfile(path):
        raise ValueError(f"{path}: no such image file")
    model = sources.build(source, img_size=img_size)
    batch = np.stack([load_image(p, img_size, args.crop_pct or source.crop_pct) for p in args.images])
    names = class_names(source)
  except (CheckpointError, ValueError, tf.errors.OpError) as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    return 2
  model.eval()
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:  # XLA:CPU's tuned kernels and compile options; plain autodiff and jax.jit elsewhere
    cpu.use_cpu_kernels(model, cpu.dot_library("auto"))
  graphdef, state = nnx.split(model)
  forward = (cpu.jit if on_cpu else jax.jit)(lambda state, x: nnx.merge(graphdef, state)(x))
  probs = np.asarray(jax.nn.softmax(forward(state, batch), axis=-1))
  for path, p in zip(args.images, probs):
    print(path)
    for idx in np.argsort(-p)[:args.top]:
      print(f"  {p[idx]:6.2%}  {idx:4d}  {names[idx]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
