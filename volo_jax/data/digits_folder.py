"""scikit-learn's digits written as an image folder (`<class>/<file>`, PNG and JPEG alternating): a stand-in for
one's own images, to try `volo_jax.data.folder` and the fine-tune recipe without a download.

  python -m volo_jax.data.digits_folder OUT_DIR [--classes 5]
"""

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np

from volo_jax.data.digits import IMAGE_SIZE
from volo_jax.errors import first_line


def digit_images(classes: int):
  """(index, 32×32×3 uint8 image, label) for every digit of the first `classes` classes, upsampled as the
  bundled `volo_digits` dataset."""
  from scipy.ndimage import zoom  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  flat, labels = load_digits(return_X_y=True)
  for i, (image, label) in enumerate(zip(flat.reshape(-1, 8, 8), labels)):
    if label < classes:
      gray = zoom(image * (255.0 / 16.0), IMAGE_SIZE // 8, order=3)
      yield i, np.repeat(np.clip(gray, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1), int(label)


def write_digits_folder(out_dir: str, classes: int = 10) -> int:
  """Writes out_dir/<digit name>/<index>.{png,jpg} (even indices PNG, odd JPEG) atomically; returns the count."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise ValueError(f"{out_dir}: already exists; choose a new output directory")
  if not 2 <= classes <= 10:
    raise ValueError(f"--classes {classes}: must be between 2 and 10")
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
  count = 0
  try:
    for i, image, label in digit_images(classes):
      os.makedirs(os.path.join(tmp, names[label]), exist_ok=True)
      png = i % 2 == 0
      data = tf.io.encode_png(image) if png else tf.io.encode_jpeg(image, quality=95)
      with open(os.path.join(tmp, names[label], f"{i:04d}.{'png' if png else 'jpg'}"), "wb") as f:
        f.write(data.numpy())
      count += 1
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return count


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m volo_jax.data.digits_folder", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out_dir")
  parser.add_argument("--classes", type=int, default=10, help="the digits 0 … classes-1")
  args = parser.parse_args(argv)
  try:
    count = write_digits_folder(args.out_dir, args.classes)
  except (ValueError, OSError) as e:
    print(f"error: {first_line(e)}", file=sys.stderr)
    return 2
  print(f"wrote {count} images of {args.classes} classes to {os.path.abspath(args.out_dir)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
