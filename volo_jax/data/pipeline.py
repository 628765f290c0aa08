"""tf.data input: each process reads only its slice of a TFDS split, decodes (JPEG decode fused with the crop),
augments and batches its share of the global batch, skipping (and counting) images that do not decode, and
stopping with one line when a shard decodes none. Runs on the host CPU, never on the accelerator."""

import dataclasses
import queue
import re
import threading
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from volo_jax.data import augment, randaugment, segmentation_input, token_label_store, transforms
from volo_jax.data.digits import VoloDigits  # noqa: F401  (registers `volo_digits` with TFDS)
from volo_jax.data.segmentation_datasets import VoloDigitsSegmentation  # noqa: F401  (and the others)
from volo_jax.errors import ConfigError, InputStalledError

STALL_EXAMPLES = 1000  # a shard that read this many examples (or all of it, if smaller) and decoded none is stuck
WAIT_LOG_SECS = 30  # a log line this often while a batch is awaited
_POLL_SECS = 0.5  # how often a waiting consumer looks at the counters and at its stop callback
BUNDLED = ("volo_digits", "volo_digits_segmentation")  # built from scikit-learn's digits on first use


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  class_names: tuple[str, ...] | None = None  # segmentation: for the per-class IoU


def builder(config):
  """The TFDS builder for config.data.dataset; the bundled digits are prepared on first use (no download)."""
  name = config.data.dataset
  try:
    b = tfds.builder(name, data_dir=config.data.data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(f"unknown TFDS dataset {name!r}") from e
  if name in BUNDLED and not b.is_prepared():
    b.download_and_prepare()
  if not b.is_prepared():
    raise ConfigError(f"TFDS dataset {name!r} is not prepared in {b.data_dir_root}: prepare it first, e.g. for "
                     "imagenet2012 put ILSVRC2012_img_{train,val}.tar in <data_dir>/downloads/manual and run "
                     f"`tfds build {name} --data_dir <data_dir>` (see README)")
  return b


def dataset_info(config) -> DatasetInfo:
  b = builder(config)
  sizes = dict(num_train=_split_size(b, config.data.train_split), num_eval=_split_size(b, config.data.eval_split))
  if _segmentation(config):
    source = segmentation_input.source(config)
    return DatasetInfo(num_classes=source.num_classes, class_names=source.class_names, **sizes)
  return DatasetInfo(num_classes=b.info.features["label"].num_classes, **sizes)


def _split_size(b, split: str) -> int:
  try:
    return b.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ConfigError(f"split {split!r} of {b.name!r}: {str(e).strip()} (splits: {', '.join(b.info.splits)})") \
        from None


def _segmentation(config) -> bool:
  return config.task == "segmentation"


def decode_train(example, seed, config, labels=None):
  """timm's train transform: random-resized crop (fused with the decode for JPEG; other formats decode whole and
  are cropped with the same box) with random interpolation, flip, RandAugment on the uint8 crop, normalise,
  random erasing.

  With a token-label store, the example also carries its label map and what the target builder needs to crop,
  flip and warp it like the image: the crop box (top, left, h, w) as fractions of the image, the flip, and the
  3×3 output → input map of RandAugment's geometric ops in coordinates normalised to the crop.
  """
  seeds = tf.random.experimental.stateless_split(seed, 5)
  image_bytes = example["image"]
  is_jpeg = tf.io.is_jpeg(image_bytes)
  other = tf.cond(is_jpeg, lambda: tf.zeros((0, 0, 3), tf.uint8), lambda: _decode_any(image_bytes))
  shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(image_bytes)[:2], lambda: tf.shape(other)[:2])
  d = config.data
  top, left, h, w = augment.random_resized_crop_window(seeds[0], shape[0], shape[1], scale=tuple(d.crop_scale),
                                                       ratio=tuple(d.crop_ratio))
  image = tf.cond(is_jpeg, lambda: tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([top, left, h, w]), channels=3),
                  lambda: other[top:top + h, left:left + w])
  image = augment.resize_random_interpolation(image, config.model.img_size, seeds[1])
  image = tf.round(image)  # PIL hands RandAugment uint8 pixels
  flip, geometry = tf.constant(False), tf.eye(3)
  if d.hflip > 0:
    image, flip = augment.random_flip(image, seeds[2], d.hflip)
  if d.randaugment and labels is not None:  # the targets follow the geometric ops: 3×3 output → input map
    image, geometry = randaugment.rand_augment(image, seeds[4], with_matrix=True, **randaugment.parse(d.randaugment))
  elif d.randaugment:  # the map's ops cost time inside tf.data even when unused
    image = randaugment.rand_augment(image, seeds[4], **randaugment.parse(d.randaugment))
  image = transforms.normalize(image)
  if d.random_erase > 0:
    image = augment.random_erasing(image, seeds[3], probability=d.random_erase)
  out = {"image": image, "label": tf.cast(example["label"], tf.int32)}
  if labels is not None:
    out["label_scores"], out["label_classes"] = labels.tf_lookup(example["file_name"])
    size = tf.cast(tf.stack([shape[0], shape[1], shape[0], shape[1]]), tf.float64)
    out["crop_box"] = tf.cast(tf.cast(tf.stack([top, left, h, w]), tf.float64) / size, tf.float32)  # as tlt
    out["flip"] = flip
    out["label_geometry"] = geometry  # RandAugment's rotate/shear/translate, for the targets
  return out


def open_token_labels(config) -> token_label_store.LabelStore | None:
  """The prepared token-label maps when token labeling is on (validate.check_token_labels has checked them)."""
  return token_label_store.LabelStore(config.token_label.dir) if config.token_label.enabled else None


def _decode_any(image_bytes):
  """Any format TensorFlow reads (PNG, GIF's first frame, BMP, JPEG) as RGB uint8: the path for non-JPEG bytes."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


_SIGNATURES = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM")  # JPEG, PNG, GIF, BMP: the formats decode_image reads


def _is_image(image_bytes):
  """Whether the bytes start with the signature of a format that `_decode_any` reads."""
  return tf.reduce_any(tf.stack([tf.strings.substr(image_bytes, 0, len(s)) == s for s in _SIGNATURES]))


def _decode_eval(example, config):
  if _segmentation(config):
    return segmentation_input.decode_eval(example, config)
  image = _decode_any(example["image"])
  image = transforms.eval_transform(image, config.model.img_size, config.data.crop_pct)
  return {"image": image, "label": tf.cast(example["label"], tf.int32), "mask": tf.constant(1.0)}


def _read(config, split: str, shuffle_seed: int | None):
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, interleave_cycle_length=16)
  if _segmentation(config):
    ds = builder(config).as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
                                    decoders=segmentation_input.decoders(config))
    return ds.map(segmentation_input.rename(config))
  return builder(config).as_dataset(split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
                                    decoders={"image": tfds.decode.SkipDecoding()})


def _deterministic(ds):
  options = tf.data.Options()
  options.deterministic = True  # parallel map/interleave keep the order: resume and multi-host need it
  return ds.with_options(options)


def data_shards(config, process_count: int) -> int:
  """How many independently shuffled streams the train split is cut into: data.shards, or one per process."""
  return config.data.shards or process_count


@dataclasses.dataclass
class _Shard:
  """One data shard of this process: its name for messages, its size, and counters that the input pipeline
  advances as it goes (examples that entered decoding, examples decoded), readable while the consumer waits."""
  name: str
  size: int
  read: tf.Variable
  decoded: tf.Variable
  raw: Callable[[], tf.data.Dataset]  # the shard's (position, undecoded example) stream from the start position
  decode: Callable  # (position, example) → decoded example, eagerly (for the first error)


class TrainBatches:
  """Iterator of this process's batches; `skipped` counts the examples dropped so far: images that did not decode
  and, with token labels, images without a label map.

  Each of the process's shards yields (raw position, example) pairs; an example whose decode or label lookup
  fails is dropped, so the gap between raw positions and delivered examples is the number skipped. A thread
  fetches each batch on request, so that the consumer can wait with a timeout: it logs while it waits, stops
  with InputStalledError when a shard reads many examples and decodes none, and `get(stop)` gives up when
  `stop()` becomes true (SIGTERM).
  """

  def __init__(self, datasets: list, start: int, per_shard: int, shards: list | None = None,
               stop: tf.Variable | None = None):
    self._iterators = [_deterministic(ds).as_numpy_iterator() for ds in datasets]
    self._start, self._per_shard, self._delivered = start, per_shard, 0
    self._shards, self._stop = shards or [], stop
    self._requests, self._results = queue.Queue(), queue.Queue()
    self._pending = False  # a request not yet answered
    self._first_error, self._closed = None, False
    self._marks = self._counts()  # (read, decoded) per shard when the last batch was delivered
    self.skipped = 0
    threading.Thread(target=_fetch, args=(self._iterators, self._requests, self._results), daemon=True,
                     name="train-input").start()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self.get()

  def get(self, stop: Callable[[], bool] | None = None) -> dict | None:
    """The next batch; None if `stop()` became true while it was awaited (the batch is then the next call's)."""
    if self._closed:
      raise StopIteration
    if not self._pending:
      self._requests.put(True)
      self._pending = True
    waited, logged = time.time(), time.time()
    while True:
      try:
        parts = self._results.get(timeout=_POLL_SECS)
        break
      except queue.Empty:
        pass
      if stop is not None and stop():
        return None
      self._check_stall()
      if time.time() - logged >= WAIT_LOG_SECS:
        logged = time.time()
        read, decoded = (sum(c) for c in zip(*self._counts())) if self._shards else (0, 0)
        what = "the first batch" if not self._delivered else "input"
        logging.info("waiting for %s for %.0fs: %d examples read, %d dropped", what, logged - waited, read,
                     read - decoded)
    self._pending = False
    if isinstance(parts, BaseException):
      raise parts
    self._delivered += self._per_shard
    self.skipped = sum(int(p["position"][-1]) + 1 - self._start - self._delivered for p in parts)
    self._marks = self._counts()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "position"}

  def _counts(self) -> list:
    return [(int(s.read.numpy()), int(s.decoded.numpy())) for s in self._shards]

  def _check_stall(self) -> None:
    for shard, (read, decoded), (read0, decoded0) in zip(self._shards, self._counts(), self._marks):
      if decoded == decoded0 and read - read0 >= min(STALL_EXAMPLES, shard.size):
        self.close()
        raise InputStalledError(f"no training batch from {shard.name}: {read - read0} examples read, all dropped; "
                                f"the first error: {self.first_error()}")

  def first_error(self) -> str:
    """The first decode or label-lookup error of this process's shards from the start position: their examples
    are decoded again, eagerly and in order, until one fails (only called once something was dropped)."""
    if self._first_error is None:
      self._first_error = "none found"
      for shard in self._shards:
        for position, example in shard.raw().take(STALL_EXAMPLES):
          try:
            shard.decode(position, example)
          except tf.errors.OpError as e:
            self._first_error = f"{shard.name}, example {int(position)}: {_clean(e.message)}"
            return self._first_error
    return self._first_error

  def close(self) -> None:
    """Ends the input pipelines and the fetching thread, even one waiting on a stream that drops everything."""
    if self._closed:
      return
    self._closed = True
    if self._stop is not None:
      self._stop.assign(True)
    self._requests.put(False)

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  (an unfinished __init__, or TensorFlow torn down at exit)
      pass


def _clean(message: str) -> str:
  """A TensorFlow error's first line without the wrapping function's and op's names."""
  first = message.strip().splitlines()[0] if message.strip() else "unknown error"
  first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", first)
  first = re.sub(r"^.*Summarized data: b'(.*)'$", r"\1", first)  # a failed tf.debugging.Assert: its message
  return re.sub(r"\s*\[Op:\w+\].*$", "", first).strip()


def _fetch(iterators: list, requests: queue.Queue, results: queue.Queue) -> None:
  """TrainBatches' thread: one list of per-shard batches (or the exception that ended the stream) per request."""
  while requests.get():
    try:
      results.put([next(it) for it in iterators])
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer, StopIteration included)
      results.put(e)
      return


def train_dataset(config, *, local_batch: int, start_step: int, process_index: int,
                  process_count: int) -> TrainBatches:
  """Infinite iterator of this process's batches, starting at global step `start_step`.

  The train split is cut into `data_shards` shards; process p reads only its shards (consecutive ones) and its
  batch is their per-shard batches concatenated, so the global batch depends on the shard count, not on how
  many processes read it. A shard's example order is a function of (seed, shard) only and every example's
  augmentation is seeded by its position in that order, so skipping start_step·(per-shard batch) still undecoded
  examples resumes exactly. Examples that fail to decode (corrupt JPEGs) or lack a token-label map are skipped
  and counted.
  """
  shards = data_shards(config, process_count)  # validate.check_batch has checked the divisions
  per_process = shards // process_count
  per_shard = local_batch // per_process
  start = start_step * per_shard
  mine = range(process_index * per_process, (process_index + 1) * per_process)
  logging.info("process %d reads shard(s) %s of %d of %r from example %d of each", process_index, list(mine),
               shards, config.data.train_split, start)
  labels = open_token_labels(config)
  stop = tf.Variable(False)  # TrainBatches.close() sets it: every shard's stream ends
  datasets, counted = [], []
  for shard in mine:
    split = tfds.split_for_jax_process(config.data.train_split, process_index=shard, process_count=shards)
    seed = config.seed + 1000 * shard
    read, decoded = tf.Variable(tf.constant(0, tf.int64)), tf.Variable(tf.constant(0, tf.int64))

    def raw(seed=seed, split=split):
      ds = _read(config, split, shuffle_seed=seed)
      ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
      return ds.enumerate().skip(start)

    def decode(i, ex, seed=seed, counters=None):
      return _decode_counted(ex, tf.stack([tf.constant(seed, tf.int64), i]), config, labels, counters)

    ds = raw().take_while(lambda *_: tf.logical_not(stop.read_value()))  # upstream of the dropping: ends even
    #                                                                      a stream that drops everything
    ds = ds.map(lambda i, ex, decode=decode, counters=(read, decoded): dict(decode(i, ex, counters=counters),
                                                                            position=i),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors()  # a corrupt image or a missing label map raises: drop it (TrainBatches counts the gap)
    datasets.append(ds.batch(per_shard, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    name = f"{config.data.dataset!r} split {config.data.train_split!r}" + (
        f" (shard {shard} of {shards})" if shards > 1 else "")
    counted.append(_Shard(name=name, size=_num_examples(config, split), read=read, decoded=decoded, raw=raw,
                          decode=decode))
  return TrainBatches(datasets, start, per_shard, counted, stop)


def _num_examples(config, split: str) -> int:
  return builder(config).info.splits[split].num_examples


def _decode_counted(example, seed, config, labels, counters=None):
  """decode_train, counting the examples that enter it and those that come out (a failing one raises between).
  Bytes that are no JPEG, PNG, GIF or BMP at all fail a check of the start marker first: one clear error, and
  libjpeg does not print a line for each such image."""
  image = example["image"]
  if counters is not None:
    with tf.control_dependencies([counters[0].assign_add(1)]):
      image = tf.identity(image)
  with tf.control_dependencies([tf.debugging.Assert(_is_image(image), ["not an image: the bytes start with no JPEG, "
                                                                        "PNG, GIF or BMP signature"])]):
    example = dict(example, image=tf.identity(image))
  if _segmentation(config):
    out = segmentation_input.decode_train(example, seed, config)
  else:
    out = decode_train(example, seed, config, labels)
  if counters is None:
    return out
  decoded = counters[1]
  with tf.control_dependencies(tf.nest.flatten(out)):
    counted = decoded.assign_add(1)
  with tf.control_dependencies([counted]):
    return tf.nest.map_structure(tf.identity, out)


def eval_dataset(config, *, local_batch: int, process_index: int, process_count: int):
  """This process's slice of the eval split, padded with mask-0 examples to the same number of batches on
  every process, so that together the processes score every example exactly once."""
  info = dataset_info(config)
  shards = tfds.even_splits(config.data.eval_split, n=process_count, drop_remainder=False)
  per_process = -(-info.num_eval // process_count)
  num_batches = -(-per_process // local_batch)
  ds = _read(config, shards[process_index], shuffle_seed=None)
  ds = ds.map(lambda ex: _decode_eval(ex, config), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ignore_errors()  # corrupt images are left out (and show as a count below the split's size)
  size = config.model.img_size
  padding = (segmentation_input.eval_padding(config) if _segmentation(config) else
             {"image": tf.zeros((size, size, 3)), "label": tf.constant(0), "mask": tf.constant(0.0)})
  padding = tf.data.Dataset.from_tensors(padding).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch).batch(local_batch)
  return _deterministic(ds.prefetch(tf.data.AUTOTUNE)).as_numpy_iterator(), num_batches
