"""`volo_digits`: scikit-learn's bundled handwritten digits (1,797 real 8×8 scans, no download) as a TFDS
dataset of 32×32 RGB JPEGs, so the embedded default trains through the same TFDS/tf.data code as ImageNet."""

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_FRACTION = 0.2


class VoloDigits(tfds.core.GeneratorBasedBuilder):
  """Digits 0–9, upsampled ×4 with cubic splines, stratified 80/20 train/test split (seed 0)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=TEST_FRACTION, random_state=0, stratify=digits.target)
    return {"train": self._generate_examples(digits, train), "test": self._generate_examples(digits, test)}

  def _generate_examples(self, digits, indices):
    from scipy.ndimage import zoom  # pylint: disable=import-outside-toplevel
    for i in indices:
      gray = zoom(digits.images[i] * (255.0 / 16.0), IMAGE_SIZE // 8, order=3)
      rgb = np.repeat(np.clip(gray, 0, 255).round().astype(np.uint8)[..., None], 3, axis=-1)
      yield int(i), {"image": rgb, "label": int(digits.target[i]), "file_name": f"digit_{i:04d}.jpg"}
