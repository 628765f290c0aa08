"""Semantic segmentation of image files with a VOLO + UperNet: a class mask and an overlay per image, and the
classes each image shows.

  python -m volo_jax.segment --config configs/segmentation.py:ade20k_volo_d1 --weights DIR IMAGE [IMAGE ...] --out OUT

Per IMAGE: OUT/<stem>.png, a palette PNG (mode "P", the dataset's colours, pixel = class index) at the image's
size, and OUT/<stem>_overlay.jpg, the colour mask blended 50% over the image; then a table of the classes present
with their share of the pixels. With one IMAGE, --out may be a .png path (the overlay goes next to it).

The config gives the model, the dataset's classes and palette and the test time, as `volo_jax.evaluate` scores it:
the image resized to the config's scale (keep ratio) on its test canvas, sliding windows (or the whole canvas),
optionally several scales and the mirrored image; the logits of the resized image's region are resized back to
the image's size (bilinear) and argmax'd. --weights: a segmentation training workdir, a converted directory or a
.pth/.safetensors file of a whole segmenter. Bad input ends in one line on stderr and exit code 2.
"""

import os
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from volo_jax import flag_errors

PROG = "python -m volo_jax.segment"
OVERLAY_ALPHA = 0.5  # the mask's weight in the overlay
PALETTE_SIZE = 256  # entries of a "P" image's palette

FLAGS = flags.FlagValues()  # its own, so that importing this next to another CLI defines no flag twice
config_flags.DEFINE_config_file("config", None, "segmentation config (model, crop, dataset, test time)",
                                flag_values=FLAGS)
flags.DEFINE_string("weights", None, "a training workdir, a converted directory or a weights file",
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory, or with one image a .png path", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "weights", "out"], flag_values=FLAGS)


def palette_image(mask: np.ndarray, palette: np.ndarray):
  """mask (H, W) uint8 class indices → a PIL "P" image whose palette starts with `palette` (K, 3) uint8."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  entries = np.zeros((PALETTE_SIZE, 3), np.uint8)
  entries[:len(palette)] = palette
  image = Image.fromarray(mask.astype(np.uint8), mode="P")
  image.putpalette(entries.reshape(-1).tolist())
  return image


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """image (H, W, 3) uint8, mask (H, W) → the mask's colours blended OVERLAY_ALPHA over the image, uint8."""
  colours = palette[mask].astype(np.float32)  # (H, W, 3)
  blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def class_shares(mask: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
  """(class, share of the pixels) for the classes present in `mask`, largest share first, ties by class."""
  counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
  present = np.flatnonzero(counts)
  order = sorted(present, key=lambda k: (-counts[k], k))
  return [(int(k), counts[k] / mask.size) for k in order]


def format_shares(shares: list[tuple[int, float]], class_names) -> str:
  return "\n".join(f"  {share:7.2%}  {k:4d}  {class_names[k]}" for k, share in shares)


def output_paths(images: list[str], out: str) -> list[tuple[str, str]]:
  """(mask .png, overlay .jpg) per image; ValueError when two images would write the same files."""
  if out.lower().endswith(".png"):
    if len(images) != 1:
      raise ValueError(f"--out {out} names one mask file, but {len(images)} images were given: pass a directory")
    stem = os.path.splitext(out)[0]
    return [(out, f"{stem}_overlay.jpg")]
  paths, seen = [], {}
  for image in images:
    stem = os.path.splitext(os.path.basename(image))[0]
    if stem in seen:
      raise ValueError(f"{seen[stem]} and {image} would both write {os.path.join(out, stem)}.png: rename one")
    seen[stem] = image
    paths.append((os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}_overlay.jpg")))
  return paths


def read_image(path: str) -> np.ndarray:
  """An image file (JPEG, PNG, GIF's first frame, BMP) → (H, W, 3) uint8; ValueError for a missing file or one
  that does not decode."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such image file")
  try:
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
  except tf.errors.OpError as e:
    raise ValueError(f"{path}: not an image this reads (JPEG, PNG, GIF, BMP)") from e


class Segmenter:
  """A config's segmenter with its weights, and its test time jitted for the config's canvases."""

  def __init__(self, config, weights: str):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from volo_jax.data import segmentation_datasets  # pylint: disable=import-outside-toplevel
    from volo_jax.errors import CheckpointError, ConfigError  # pylint: disable=import-outside-toplevel
    from volo_jax.models import segmenter  # pylint: disable=import-outside-toplevel
    from volo_jax.train import checkpoint, loop, segmentation_step  # pylint: disable=import-outside-toplevel
    kind = config.get("task")
    if kind != "segmentation":
      raise ConfigError(f"--config {config.get('experiment', '')} is a {kind} config, not a segmentation one")
    self.config = config
    self.source = segmentation_datasets.source(config.data.dataset)
    model = loop.build_model(config, self.source.num_classes)
    report = checkpoint.load_pretrained(model, weights)
    heads = [name for name in report.loaded if name.startswith(("decode_head.", "auxiliary_head."))]
    if report.left_at_init or not heads:  # a classifier's weights fill the backbone only
      raise CheckpointError(f"{weights}: not a whole segmenter's weights (" + (
          f"{len(report.left_at_init)} tensors left at init, e.g. {report.left_at_init[0]})" if report.left_at_init
          else "no decode head: a classifier's?)"))
    model.eval()
    graphdef, self.state = nnx.split(model)
    settings = segmentation_step.test_time_settings(config)
    canvas = tuple(config.segmentation.eval_canvas)

    def scores(state, images, sizes, base_size):
      return segmenter.predict_logits(nnx.merge(graphdef, state), images, sizes, base_size, canvas, **settings)

    self.scores = loop.jit(config, scores)

  def mask(self, image: np.ndarray) -> np.ndarray:
    """image (H, W, 3) uint8 → (H, W) uint8 class indices."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from volo_jax.data import segmentation_transforms  # pylint: disable=import-outside-toplevel
    from volo_jax.models.upernet import resize_bilinear  # pylint: disable=import-outside-toplevel
    s = self.config.segmentation
    height, width = image.shape[:2]
    example = segmentation_transforms.eval_transform(
        tf.constant(image), tf.zeros((height, width), tf.uint8), scale=tuple(s.scale), canvas=tuple(s.eval_canvas),
        crop=self.config.model.img_size, test_scales=tuple(s.test_scales))
    images = tuple(x.numpy()[None] for x in example["images"])  # (1, Hc_s, Wc_s, 3) per test scale
    sizes = tuple(x.numpy()[None] for x in example["sizes"])  # (1, 2)
    base_size = example["size"].numpy()  # (2,): the resized image's (h, w) on the canvas
    h, w = base_size
    scores = self.scores(self.state, images, sizes, base_size[None])  # (1, Hc, Wc, K)
    logits = resize_bilinear(jnp.asarray(scores)[:, :h, :w], (height, width))  # (1, H, W, K)
    return np.asarray(jnp.argmax(logits[0], axis=-1)).astype(np.uint8)


def segment(config, weights: str, images: list[str], out: str) -> list[dict]:
  """Writes each image's mask and overlay; returns per image {'image', 'mask', 'overlay', 'shares'}."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  paths = output_paths(images, out)
  pixels = [read_image(path) for path in images]  # every input checked before any compile
  model = Segmenter(config, weights)
  palette = model.source.palette
  results = []
  for path, image, (mask_path, overlay_path) in zip(images, pixels, paths):
    mask = model.mask(image)
    os.makedirs(os.path.dirname(mask_path) or ".", exist_ok=True)
    palette_image(mask, palette).save(mask_path)
    Image.fromarray(overlay(image, mask, palette)).save(overlay_path, quality=90)
    results.append({"image": path, "mask": mask_path, "overlay": overlay_path,
                    "shares": class_shares(mask, model.source.num_classes)})
    print(f"{path} ({image.shape[1]}×{image.shape[0]}) → {mask_path}, {overlay_path}")
    print(format_shares(results[-1]["shares"], model.source.class_names))
  return results


def parse(argv: list[str]) -> list[str]:
  """absl-parses `argv` (program name first) into FLAGS; returns the image paths. A bad flag or config ends in
  one line, exit 2, as flag_errors.parser."""
  FLAGS.unparse_flags()
  if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
    print(__doc__ + "\nflags:\n" + FLAGS.get_help())
    sys.exit(0)
  try:
    remaining = FLAGS(argv)
    FLAGS["config"].value.keys()  # a config file that fails to load raises at its first use: make that now
  except Exception as e:  # absl's flags.Error, ml_collections' AttributeError/KeyError/TypeError, get_config's
    print(f"{PROG}: error: {flag_errors.describe(argv, e)}", file=sys.stderr)
    sys.exit(2)
  if len(remaining) < 2:
    print(f"{PROG}: error: no image given", file=sys.stderr)
    sys.exit(2)
  return remaining[1:]


def main(argv: list[str] | None = None) -> int:
  """The command line without the program name (default: sys.argv's)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from volo_jax import errors  # pylint: disable=import-outside-toplevel
  images = parse([PROG] + list(sys.argv[1:] if argv is None else argv))
  try:
    segment(FLAGS.config, FLAGS.weights, images, FLAGS.out)
  except (*errors.BAD_INPUT, ValueError, OSError, tf.errors.OpError) as e:
    print(f"{PROG}: error: {errors.first_line(e)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
