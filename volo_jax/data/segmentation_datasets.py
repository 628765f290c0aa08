"""Semantic-segmentation datasets: what each stored TFDS dataset holds (feature keys, classes, palette, raw label
value → train id with 255 ignored), and the TFDS builders for ADE20K's challenge data and the embedded digits."""

import dataclasses
import pathlib
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from volo_jax.errors import ConfigError

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationSource:
  """A TFDS segmentation dataset as stored: its feature keys, classes and the raw label → train id table."""

  name: str  # TFDS name, with the config when there is one
  image_key: str
  label_key: str
  class_names: tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8, the colour of each train id
  raw_classes: np.ndarray  # (256,) uint8: stored label value → train id, IGNORE_INDEX for the ignored values
  raw_valid: np.ndarray  # (256,) bool: stored label values the dataset can legitimately contain

  @property
  def num_classes(self) -> int:
    """The number of train ids (classes scored by mIoU)."""
    return len(self.class_names)

  def train_ids(self, label: tf.Tensor) -> tf.Tensor:
    """Stored uint8 label values → uint8 train ids (255 = ignore), any shape, e.g. (H, W)."""
    return tf.gather(tf.constant(self.raw_classes), tf.cast(label, tf.int32))

  def invalid_values(self, label: np.ndarray) -> np.ndarray:
    """The sorted stored label values present in `label` that this dataset cannot contain."""
    values = np.unique(np.asarray(label)).astype(np.int64)
    in_table = (values >= 0) & (values < len(self.raw_valid))
    valid = np.zeros_like(in_table)
    valid[in_table] = self.raw_valid[values[in_table]]
    return values[~valid]


def _lookup(pairs: dict[int, int], valid_values: range) -> tuple[np.ndarray, np.ndarray]:
  """(raw → train id table, raw-valid mask) from {raw value: train id}; unlisted values map to IGNORE_INDEX."""
  raw_classes = np.full(256, IGNORE_INDEX, np.uint8)
  raw_classes[list(pairs)] = list(pairs.values())
  raw_valid = np.zeros(256, bool)
  raw_valid[list(valid_values)] = True
  return raw_classes, raw_valid


# Cityscapes: cityscapesscripts/helpers/labels.py, the 19 evaluated classes (labelId → trainId; the others,
# ignoreInEval, → 255). The license plate (id −1) is never drawn into gtFine_labelIds, so raw values are 0–33.
CITYSCAPES_LABEL_IDS = {
    7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 31: "train", 32: "motorcycle", 33: "bicycle",
}
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# ADE20K SceneParsing (ADEChallengeData2016): mmsegmentation's ADE20KDataset classes and palette, in train id order
# (raw value k ↦ k − 1; raw 0 "other" is ignored, mmseg's reduce_zero_label).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

DIGITS_CLASSES = ("background",) + tuple(str(d) for d in range(10))
DIGITS_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


def _source(name, image_key, label_key, class_names, palette, pairs, valid_values) -> SegmentationSource:
  raw_classes, raw_valid = _lookup(pairs, valid_values)
  return SegmentationSource(name, image_key, label_key, tuple(class_names), np.asarray(palette, np.uint8),
                            raw_classes, raw_valid)


SOURCES: dict[str, SegmentationSource] = {
    "cityscapes/semantic_segmentation": _source(
        "cityscapes/semantic_segmentation", "image_left", "segmentation_label", CITYSCAPES_LABEL_IDS.values(),
        CITYSCAPES_PALETTE, {raw: i for i, raw in enumerate(CITYSCAPES_LABEL_IDS)}, range(34)),
    "ade20k_challenge": _source(
        "ade20k_challenge", "image", "segmentation", ADE20K_CLASSES, ADE20K_PALETTE,
        {k: k - 1 for k in range(1, len(ADE20K_CLASSES) + 1)}, range(len(ADE20K_CLASSES) + 1)),
    "volo_digits_segmentation": _source(
        "volo_digits_segmentation", "image", "segmentation", DIGITS_CLASSES, DIGITS_PALETTE,
        {k: k for k in range(len(DIGITS_CLASSES))}, range(len(DIGITS_CLASSES))),
}


def source(name: str) -> SegmentationSource:
  """The SegmentationSource of a TFDS name; ConfigError (one line) for a dataset we have no table for."""
  if name not in SOURCES:
    raise ConfigError(f"unknown segmentation dataset {name!r}; known: {', '.join(sorted(SOURCES))}")
  return SOURCES[name]


ADE20K_ZIP = "ADEChallengeData2016.zip"
ADE20K_SPLITS = {"train": "training", "validation": "validation"}


class Ade20kChallenge(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing, the 150-class benchmark (ADEChallengeData2016: 20,210 train, 2,000 validation images).
  The JPEGs are stored unchanged; 'segmentation' keeps the raw PNG values 0–150 (0 = other), mapped at read
  time by SOURCES['ade20k_challenge']."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Download {ADE20K_ZIP} from http://data.csail.mit.edu/places/ADEchallenge/{ADE20K_ZIP}, put it in "
      "<data_dir>/downloads/manual/ and run `tfds build ade20k_challenge --data_dir <data_dir> --imports "
      "volo_jax.data.segmentation_datasets` (or let the trainer prepare it).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "segmentation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "segmentation"),
    )

  def _split_generators(self, dl_manager):
    archive = pathlib.Path(dl_manager.manual_dir) / ADE20K_ZIP
    return {split: self._generate_examples(archive, folder) for split, folder in ADE20K_SPLITS.items()}

  def _generate_examples(self, archive, folder):
    images_dir = f"ADEChallengeData2016/images/{folder}/"
    labels_dir = f"ADEChallengeData2016/annotations/{folder}/"
    with zipfile.ZipFile(archive) as zf:
      names = set(zf.namelist())
      for name in sorted(names):
        if not (name.startswith(images_dir) and name.endswith(".jpg")):
          continue
        stem = name[len(images_dir):-len(".jpg")]
        label_name = f"{labels_dir}{stem}.png"
        if label_name not in names:
          raise FileNotFoundError(f"{ADE20K_ZIP} has {name} but no {label_name}")
        # encoded bytes pass through the Image features unchanged (no decode, no re-encode)
        yield stem, {"image": zf.read(name), "segmentation": zf.read(label_name), "file_name": f"{stem}.jpg"}


CANVAS_SIZE = 64
DIGIT_SIDES = (36, 56)  # inclusive range of a pasted digit's side in pixels
MAX_DIGITS = 1  # per canvas
INK_LEVEL = 32  # a pasted digit's pixel is ink (labelled) from this upsampled intensity on: 1/8 of full ink
CANVASES = {"train": 2000, "test": 500}


class VoloDigitsSegmentation(tfds.core.GeneratorBasedBuilder):
  """The embedded default for segmentation, built in seconds with no download: 64×64 RGB canvases, each with
  one of scikit-learn's real handwritten digits (8×8 scans upsampled with cubic splines to 36–56 px, in a random
  colour). Label per pixel: digit + 1 where a digit's ink is, 0 (background)
  elsewhere. Train and test canvases draw from volo_digits' stratified 80/20 split of the scans (seed 0)."""

  VERSION = tfds.core.Version("1.3.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(CANVAS_SIZE, CANVAS_SIZE, 3), encoding_format="png"),
            "segmentation": tfds.features.Image(shape=(CANVAS_SIZE, CANVAS_SIZE, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "segmentation"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships inside scikit-learn
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
    return {"train": self._generate_examples(digits, train, "train", seed=0),
            "test": self._generate_examples(digits, test, "test", seed=1)}

  def _generate_examples(self, digits, scans, split, seed):
    rng = np.random.default_rng(seed)
    for i in range(CANVASES[split]):
      image, label = paste_digits(digits.images, digits.target, scans, rng)
      yield i, {"image": image, "segmentation": label[..., None], "file_name": f"canvas_{split}_{i:04d}.png"}


def paste_digits(scans: np.ndarray, classes: np.ndarray, pool: np.ndarray, rng: np.random.Generator):
  """One digits canvas: (image (64, 64, 3) uint8, label (64, 64) uint8). Each digit's colour has its largest
  channel at 1, and digits combine by the per-channel maximum, so a pixel's brightest channel is the brightest
  ink over it: label > 0 exactly where that channel is ≥ INK_LEVEL."""
  from scipy.ndimage import zoom  # pylint: disable=import-outside-toplevel
  image = np.zeros((CANVAS_SIZE, CANVAS_SIZE, 3), np.uint8)
  label = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
  for _ in range(rng.integers(1, MAX_DIGITS + 1)):
    scan = rng.choice(pool)
    side = int(rng.integers(DIGIT_SIDES[0], DIGIT_SIDES[1] + 1))
    gray = zoom(scans[scan] * (255.0 / 16.0), side / 8, order=3)  # (side, side)
    gray = np.clip(gray, 0, 255).round().astype(np.uint8)
    colour = rng.uniform(0.3, 1.0, 3)
    colour /= colour.max()
    top, left = rng.integers(0, CANVAS_SIZE - side + 1, size=2)
    box = np.s_[top:top + side, left:left + side]
    painted = np.round(gray[..., None] * colour).astype(np.uint8)  # (side, side, 3)
    image[box] = np.maximum(image[box], painted)
    label[box] = np.where(gray >= INK_LEVEL, classes[scan] + 1, label[box])
  return image, label

