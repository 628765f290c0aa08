"""Throughput benchmark: VOLO inference, the full train step and the train input pipeline, optionally against
timm's PyTorch model on the same inputs in the same process.

  python -m volo_jax.bench --model volo_d1 --img-size 224 --batch 8 --mode infer,train --compare-torch --json OUT

Per case: images/s (median, min, max of --runs timed runs after --warmup), step time, compile time, FLOPs per
image from XLA's cost analysis next to the paper's (multiply-adds ×2), achieved FLOP/s and its fraction of the
matmul peak measured in the same run, memory (the backend's peak where it reports one, else XLA's buffer
assignment of the compiled step), and the process's CPU seconds per run with the host cores they kept busy.

The `jax` rows run as the trainer does: on a CPU backend with `volo_jax.cpu`'s kernels and compile options.
`--plain` adds `jax_plain` rows: create_model's model as it is in a plain jax.jit, what a user's own loop gets.
`--task segmentation` times VOLO + UperNet instead (volo_jax/bench_segmentation.py).
"""

import argparse
import io
import itertools
import json
import os
import platform
import statistics
import sys
import time

from volo_jax.cpu import xla as cpu_xla

# Paper "FLOPs" (multiply-adds) per image, in G, by (variant, image size): Table 2/3 of arXiv 2106.13112.
PAPER_GMACS = {
    ("volo_d1", 224): 6.8, ("volo_d2", 224): 14.1, ("volo_d3", 224): 20.6, ("volo_d4", 224): 43.8,
    ("volo_d5", 224): 69.0, ("volo_d1", 384): 22.8, ("volo_d2", 384): 46.1, ("volo_d3", 448): 67.9,
    ("volo_d4", 448): 197.0, ("volo_d5", 448): 304.0, ("volo_d5", 512): 412.0,
}
MODES = ("infer", "train", "input")


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m volo_jax.bench", description=__doc__.split("\n\n")[0].replace("\n", " "))
  p.add_argument("--task", default="classification", choices=("classification", "segmentation"),
                 help="classification: VOLO at --img-size; segmentation: VOLO + UperNet at --crop, train step and "
                      "sliding-window inference (modes infer, train)")
  p.add_argument("--model", default="volo_d1", help="volo_d1 … volo_d5, volo_tiny")
  p.add_argument("--img-size", type=int, default=224)
  p.add_argument("--crop", type=int, default=512,
                 help="--task segmentation: the train crop and the inference window, a multiple of 16")
  p.add_argument("--batch", type=int, default=8, help="global batch (split over all local devices)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--mode", default="infer,train", help="comma list of infer, train, input")
  p.add_argument("--compare-torch", action="store_true", help="time timm's model (eager, torch.compile) too")
  p.add_argument("--no-torch-compile", action="store_true", help="with --compare-torch: eager only")
  p.add_argument("--scan", action="store_true", help="scan over identical blocks (stacked parameters)")
  p.add_argument("--remat", default="none", help="rematerialisation policy: none, full, dots, dots_saveable")
  p.add_argument("--runs", type=int, default=5, help="timed runs per case (the median is reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed runs after compilation")
  p.add_argument("--cpu-dots", default="auto", choices=cpu_xla.CHOICES,
                 help="XLA:CPU's matmul library (volo_jax/cpu/xla.py); auto: oneDNN on AVX-512 CPUs, else YNNPACK; "
                      "default: no compile options")
  p.add_argument("--plain", action="store_true",
                 help="infer, train: also time the plain model (no CPU kernels) in a plain jax.jit (row jax_plain)")
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores, as XLA:CPU uses)")
  p.add_argument("--input-images", type=int, default=64,
                 help="--mode input: distinct JPEGs, each read about 4× (whole batches)")
  p.add_argument("--outlook-breakdown", action="store_true",
                 help="--mode train: time and FLOPs of the stage-1 outlook attention layers alone")
  p.add_argument("--trace", default="", help="write a jax.profiler trace of the timed JAX runs to this dir")
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--default-malloc", action="store_true",
                 help="leave glibc's malloc and JAX's CPU dispatch as they are (by default, on a host without an "
                      "accelerator, freed memory is kept in the process for both frameworks and single-device "
                      "computations run on the calling thread: see volo_jax/cpu/host_memory.py)")
  args = p.parse_args(argv)
  args.modes = [m.strip() for m in args.mode.split(",") if m.strip()]
  unknown = sorted(set(args.modes) - set(MODES))
  if unknown or not args.modes:
    p.error(f"--mode takes a comma list of {', '.join(MODES)}; got {args.mode!r}")
  if args.task == "segmentation":
    if "input" in args.modes:
      p.error("--task segmentation times infer and train, not input")
    if args.crop <= 0 or args.crop % 16:
      p.error(f"--crop must be a positive multiple of 16; got {args.crop}")
    args.img_size = args.crop  # the rows' img_size
  return args


def _stats(values):
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_runs(run, *, warmup: int, runs: int) -> list[float]:
  """Wall seconds of `runs` calls of `run` (which must block until its work is done), after `warmup` calls."""
  return interleaved_times([run], warmup=warmup, runs=runs)[0]


def interleaved_times(runs_to_time, *, warmup: int, runs: int, cpu_times=None) -> list[list[float]]:
  """Times several runners round-robin (a, b, a, b, …), so that a load change on a shared machine hits all of
  them alike and their ratio stays meaningful. `cpu_times`, one list per runner, receives the process's CPU
  seconds (all threads) of each timed run."""
  for _ in range(warmup):
    for run in runs_to_time:
      run()
  times = [[] for _ in runs_to_time]
  cpu_times = cpu_times if cpu_times is not None else [[] for _ in runs_to_time]
  for _ in range(runs):
    for run, record, cpu_record in zip(runs_to_time, times, cpu_times):
      start, cpu_start = time.perf_counter(), time.process_time()
      run()
      record.append(time.perf_counter() - start)
      cpu_record.append(time.process_time() - cpu_start)
  return times


def throughput(times: list[float], images: int) -> dict:
  """images/s as `images` ÷ the median, slowest and fastest run, next to those times."""
  step = _stats(times)
  return {"images_per_s": {"median": images / step["median"], "min": images / step["max"],
                           "max": images / step["min"]}, "step_time_s": step}


# ----------------------------------------------------------------------------------------------------- JAX

def matmul_peak(dtype_name: str, dots: str) -> dict:
  """FLOP/s of a large square matmul on one device, compiled as the steps are: the practical peak MFU is
  measured against."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  size = 2048 if jax.default_backend() == "cpu" else 8192
  dtype = jnp.dtype(dtype_name)
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = cpu_xla.jit(lambda a, b: a @ b, dots=dots)
  times = time_runs(lambda: matmul(a, b).block_until_ready(), warmup=2, runs=5)
  return {"size": size, "dtype": dtype_name, "flops_per_s": 2 * size**3 / statistics.median(times)}


def _compiled_facts(lowered, devices: int = 1, *, scanned: bool = False) -> tuple:
  """(compiled, compile seconds, FLOPs per call over its `devices`, buffer bytes of the compiled program).

  XLA's cost analysis counts one device's share of a partitioned program: the whole call is `devices` times it.
  It counts a loop's body once, so a `scanned` model's FLOPs are None (a scanned stack would count as one block).
  """
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  buffer_bytes = None
  if memory is not None:
    buffer_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                    - memory.alias_size_in_bytes)
  flops = devices * float(cost.get("flops", 0.0)) if cost and not scanned else None
  return compiled, compile_s, flops, buffer_bytes


def _backend_peak_bytes():
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _torch_peak_bytes():
  """PyTorch's CUDA allocator peak (all its cases together); None on CPU, where it keeps no such count."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _on_cpu() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == "cpu"


def _jit(fun, args, *, plain: bool, **jit_kwargs):
  """The trainer's jit (XLA:CPU compile options for --cpu-dots), or for `plain` jax.jit as it is."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(fun, **jit_kwargs) if plain else cpu_xla.jit(fun, dots=args.cpu_dots, **jit_kwargs)


def _jax_model(args, *, train: bool, plain: bool = False):
  """The model, initialised on the default device (under a mesh every eager init op would run on all its
  devices; the callers place the state on the mesh). On a CPU backend, unless `plain`, with the CPU kernels for
  --cpu-dots' library, as the trainer builds it."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from volo_jax.cpu.kernels import use_cpu_kernels  # pylint: disable=import-outside-toplevel
  from volo_jax.models import create_model  # pylint: disable=import-outside-toplevel
  extra = {"scan_blocks": True} if args.scan else {}
  if args.remat != "none":
    extra["remat"] = args.remat
  with jax.set_mesh(None):
    model = create_model(args.model, img_size=args.img_size, num_classes=1000, seed=0,
                         drop_path_rate=args.drop_path_rate if train else 0.0, dtype=jnp.dtype(args.dtype), **extra)
  if _on_cpu() and not plain:
    use_cpu_kernels(model, cpu_xla.dot_library(args.cpu_dots))
  return model


def _images(args):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.random.default_rng(0).standard_normal((args.batch, args.img_size, args.img_size, 3)).astype("float32")


def jax_infer(args, mesh, *, plain: bool = False) -> tuple[dict, callable]:
  """The eval forward (class + aux head), jitted over the split model state, data parallel over local devices;
  `plain`: the model as create_model builds it, in jax.jit."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  model = _jax_model(args, train=False, plain=plain)
  model.eval()
  graphdef, state = nnx.split(model)
  images = jax.device_put(_images(args), jax.NamedSharding(mesh, jax.P("data")))
  state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))
  forward = _jit(lambda state, x: nnx.merge(graphdef, state)(x), args, plain=plain)
  compiled, compile_s, flops, buffer_bytes = _compiled_facts(forward.lower(state, images), mesh.size,
                                                              scanned=args.scan)
  facts = dict(compile_time_s=compile_s, flops_per_call=flops, compiled_buffer_bytes=buffer_bytes)
  return facts, lambda: compiled(state, images).block_until_ready()


def _train_config(args):
  """The experiment's recipe when it has one (drop path, optimizer), else the common defaults; EMA and token
  labeling off."""
  from configs import common, imagenet  # pylint: disable=import-outside-toplevel
  name = f"{args.model}_{args.img_size}"
  config = imagenet.get_config(name) if name in imagenet.EXPERIMENTS else common.base_config()
  config.model.name, config.model.img_size, config.model.dtype = args.model, args.img_size, args.dtype
  config.ema_decay = 0.0
  config.token_label.enabled = False  # the plain label-smoothed step, the same work as the PyTorch side
  return config


def jax_train(args, mesh, *, plain: bool = False) -> tuple[dict, callable]:
  """One full train step as the trainer runs it: forward, backward, AdamW, donated state, data parallel;
  `plain`: the same step function on the model as create_model builds it, in jax.jit."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from volo_jax.train import optim, step as step_lib  # pylint: disable=import-outside-toplevel
  config = _train_config(args)
  model = _jax_model(args, train=True, plain=plain)
  graphdef, params, batch_stats, rng_template = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  tx = optim.make_optimizer(config, steps_per_epoch=1000)
  replicated = jax.NamedSharding(mesh, jax.P())
  state = jax.device_put(step_lib.initial_state(params, batch_stats, tx), replicated)
  data = jax.NamedSharding(mesh, jax.P("data"))
  batch = {"image": jax.device_put(_images(args), data),
           "label": jax.device_put(jnp.arange(args.batch, dtype=jnp.int32) % 1000, data)}
  step = _jit(step_lib.make_train_step(graphdef, rng_template, tx, config, 1000), args, plain=plain,
              donate_argnums=0)
  compiled, compile_s, flops, buffer_bytes = _compiled_facts(step.lower(state, batch), mesh.size,
                                                              scanned=args.scan)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    metrics["loss"].block_until_ready()

  return dict(compile_time_s=compile_s, flops_per_call=flops, compiled_buffer_bytes=buffer_bytes), run


def outlook_share(args, step_result) -> dict:
  """Forward + backward of the stage-1 outlook attention layers alone, as a share of the whole train step."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from volo_jax.cpu.kernels import use_cpu_kernels  # pylint: disable=import-outside-toplevel
  from volo_jax.models.outlook import OutlookAttention  # pylint: disable=import-outside-toplevel
  from volo_jax.models.volo import PATCH_SIZE, VARIANTS, parse_model_name  # pylint: disable=import-outside-toplevel
  variant = VARIANTS[parse_model_name(args.model)[0]]
  dtype = jnp.dtype(args.dtype)
  layer = OutlookAttention(variant.embed_dims[0], variant.num_heads[0], dtype=dtype, rngs=nnx.Rngs(0))
  if _on_cpu():  # as in the step it is a share of
    use_cpu_kernels(layer, cpu_xla.dot_library(args.cpu_dots))
  graphdef, state = nnx.split(layer)
  side = args.img_size // PATCH_SIZE  # stage 1 runs on the stride-8 map
  x = jax.random.normal(jax.random.key(0), (args.batch, side, side, variant.embed_dims[0]), dtype)
  grad = cpu_xla.jit(jax.grad(lambda s, x: (nnx.merge(graphdef, s)(x).astype(jnp.float32) ** 2).sum(),
                              argnums=(0, 1)), dots=args.cpu_dots)
  compiled, _, flops, _ = _compiled_facts(grad.lower(state, x))
  layer_s = statistics.median(time_runs(lambda: jax.block_until_ready(compiled(state, x)), warmup=args.warmup,
                                        runs=args.runs))
  blocks, step_flops = variant.layers[0], step_result["flops_per_call"]
  return {"blocks": blocks, "fwd_bwd_time_s_per_layer": layer_s, "fwd_bwd_flops_per_layer": flops,
          "time_share": blocks * layer_s / step_result["step_time_s"]["median"],
          "flops_share": blocks * flops / step_flops if flops and step_flops else None}


# ------------------------------------------------------------------------------------------------- PyTorch

def torch_runners(args, mode: str) -> list[tuple[dict, callable]]:
  """timm's VOLO on the same inputs, eager and torch.compile'd: (facts, run) pairs; a failed torch.compile
  gives (facts with its error, None)."""
  import torch  # pylint: disable=import-outside-toplevel
  import timm  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  model_kw = dict(img_size=args.img_size, num_classes=1000)
  if mode == "train":
    model_kw["drop_path_rate"] = args.drop_path_rate
  model = timm.create_model(f"{args.model}_224", **model_kw).to(device)  # img_size sets the size
  images = torch.from_numpy(_images(args)).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.arange(args.batch, device=device) % 1000
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
  config = _train_config(args)

  def make_run(net):
    def infer():
      with torch.no_grad(), autocast:
        net(images)
      sync()

    def train():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = torch.nn.functional.cross_entropy(net(images).float(), labels,
                                                 label_smoothing=config.label_smoothing)
      loss.backward()
      optimizer.step()
      sync()
    return infer if mode == "infer" else train

  model.train(mode == "train")
  runners = [({"framework": "torch_eager", "compile_time_s": None}, make_run(model))]
  if not args.no_torch_compile:
    runners.append(torch_compiled_runner(make_run, model))
  return runners


def torch_compiled_runner(make_run, model) -> tuple[dict, callable]:
  """(facts, run) of `make_run(torch.compile(model))`, compiled by a first run; (facts with the error, None) when
  torch.compile fails."""
  import torch  # pylint: disable=import-outside-toplevel
  case = {"framework": "torch_compile"}
  try:
    compiled_run = make_run(torch.compile(model))
    start = time.perf_counter()
    compiled_run()  # compiles
    case["compile_time_s"] = time.perf_counter() - start
    return case, compiled_run
  except Exception as e:  # pylint: disable=broad-except  # torch.compile needs a toolchain; record why not
    case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return case, None


# --------------------------------------------------------------------------------------------- input pipeline

def sample_jpegs(count: int) -> list[bytes]:
  """ImageNet-sized JPEGs (≈500×375, quality 90) made from scikit-learn's two bundled photographs."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_sample_image  # pylint: disable=import-outside-toplevel
  photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
  blobs = []
  for i in range(count):
    size = (375 + 2 * (i % 50), 500 + 3 * (i % 50))
    image = tf.image.resize(photos[i % 2], size, antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    blobs.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return blobs


def input_cases(args, compare_torch: bool) -> list[dict]:
  """Train transform images/s on one CPU core, in batches of --batch: our tf.data map and batching vs timm's
  PIL/torchvision transform and collation; also images per second of process CPU time, which counts any thread
  beyond the one each side is given."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from volo_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  # Some kernels (the antialiased resize among them) shard their work over TF's global intra-op pool whatever
  # tf.data's max_intra_op_parallelism says; on one core that pool's threads only spin. Settable only before
  # TensorFlow's first op in the process.
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
  except RuntimeError:
    pass
  config = _train_config(args)
  blobs = sample_jpegs(args.input_images)
  num_batches = max(1, 4 * len(blobs) // args.batch)  # each JPEG about 4 times, in whole batches
  count = num_batches * args.batch
  ds = tf.data.Dataset.from_tensor_slices({"image": blobs, "label": np.zeros(len(blobs), np.int64)})
  ds = ds.repeat().enumerate().map(
      lambda i, ex: pipeline.decode_train(ex, tf.stack([tf.constant(0, tf.int64), i]), config),
      num_parallel_calls=1)
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  # Batched as the trainer batches (one Python-side element per batch), and one iterator for all runs, as a
  # training run has: making one instantiates the transform's graph, a cost per run, not per image.
  batches = iter(ds.batch(args.batch).with_options(options))

  def ours():
    for _ in range(num_batches):
      next(batches)

  runners = [({"framework": "jax_tf_data"}, ours)]
  if compare_torch:
    import timm.data  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    model_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _allow_zero_bit_posterize()
    d = config.data
    transform = timm.data.create_transform(args.img_size, is_training=True, auto_augment=d.randaugment or None,
                                           re_prob=d.random_erase, interpolation="random")

    def theirs():  # as timm's loader does in a worker: transform each image, collate each batch
      stream = itertools.cycle(blobs)
      for _ in range(num_batches):
        images = [transform(Image.open(io.BytesIO(next(stream))).convert("RGB")) for _ in range(args.batch)]
        torch.utils.data.default_collate([(image, 0) for image in images])

    runners.append(({"framework": "torch_pil"}, theirs))
  cpu_times = [[] for _ in runners]  # process CPU seconds, all threads: tf.data may use more than its map thread
  all_times = interleaved_times([run for _, run in runners], warmup=1, runs=args.runs, cpu_times=cpu_times)
  results = [dict(facts, **throughput(times, count)) for (facts, _), times in zip(runners, all_times)]
  for case, cpu in zip(results, cpu_times):
    case["cpu_time_s"] = _stats(cpu)
    case["images_per_cpu_s"] = count / statistics.median(cpu)
  if compare_torch:
    torch.set_num_threads(model_threads)
    results[0]["speedup_vs_torch_pil"] = (results[0]["images_per_s"]["median"]
                                          / results[1]["images_per_s"]["median"])
    results[0]["speedup_vs_torch_pil_per_cpu_s"] = results[0]["images_per_cpu_s"] / results[1]["images_per_cpu_s"]
  results[0]["tf_intra_op_threads"] = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TF's default
  for case in results:
    case["per_core"] = True
  return results


def _allow_zero_bit_posterize():
  """timm's PosterizeIncreasing reaches 0 bits at magnitude 10, which Pillow ≥ 10 rejects (older Pillow returned
  a black image); restore the old result so timm's transform runs through a whole benchmark."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  posterize = ImageOps.posterize
  if getattr(posterize, "allows_zero_bits", False):
    return

  def posterize_any_bits(image, bits):
    return Image.new(image.mode, image.size) if bits == 0 else posterize(image, bits)

  posterize_any_bits.allows_zero_bits = True
  ImageOps.posterize = posterize_any_bits


# ------------------------------------------------------------------------------------------------- driver

def _finish_case(case: dict, args, mode: str, peak: dict | None) -> dict:
  """Adds the model facts, FLOPs per image, FLOP/s and MFU to a timed case."""
  base = {"task": args.task, "mode": mode, "model": args.model, "img_size": args.img_size, "batch": args.batch,
          "dtype": args.dtype, "scan": args.scan, "remat": args.remat}
  case = dict(base, **case)
  gmacs = PAPER_GMACS.get((args.model, args.img_size)) if args.task == "classification" else None
  # The paper counts one image's forward; a train step is ≈3× its forward (backward ≈ 2× forward).
  paper = gmacs * 2e9 * (3 if mode == "train" else 1) if gmacs and mode != "input" else None
  case["paper_flops_per_image"] = paper
  per_call = case.pop("flops_per_call", None)
  case["flops_per_image"] = per_call / args.batch if per_call else None
  flops_per_image = case["flops_per_image"] or paper
  case["flops_source"] = "xla" if case["flops_per_image"] else "paper" if paper else None
  if "images_per_s" in case and flops_per_image and mode != "input":
    case["flops_per_s"] = flops_per_image * case["images_per_s"]["median"]
    case["mfu"] = case["flops_per_s"] / (peak["flops_per_s"] * peak["devices"]) if peak else None
  return case


def run(args) -> dict:
  from volo_jax.cpu import host_memory  # pylint: disable=import-outside-toplevel
  args.host_memory_retained = not args.default_malloc and host_memory.tune_for_cpu_backend()
  if args.compare_torch:
    import torch  # pylint: disable=import-outside-toplevel  # before TensorFlow: the reverse order can crash
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    torch.set_num_threads(args.threads or os.cpu_count())
  import jax  # pylint: disable=import-outside-toplevel
  if args.batch % jax.local_device_count():
    raise SystemExit(f"--batch {args.batch} does not divide over the {jax.local_device_count()} local devices")
  if args.task == "classification":
    args.drop_path_rate = _train_config(args).model.drop_path_rate
  peak = None
  if {"infer", "train"} & set(args.modes):
    # MFU's denominator: one device's peak times the devices, except on CPU, where the (fake) devices share the
    # host's cores and one device's matmul already uses them all.
    peak = dict(matmul_peak(args.dtype, args.cpu_dots),
                devices=1 if jax.default_backend() == "cpu" else jax.local_device_count())
  data_mesh = jax.make_mesh((jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  cases = []
  for mode in args.modes:
    if mode == "input":
      cases += [_finish_case(c, args, mode, peak) for c in input_cases(args, args.compare_torch)]
      continue
    if args.task == "segmentation":
      from volo_jax import bench_segmentation  # pylint: disable=import-outside-toplevel
      runners, jax_cases = bench_segmentation.runners(args, mode, data_mesh)
    else:
      jax_case = jax_infer if mode == "infer" else jax_train
      runners = []
      for framework, plain in [("jax", False)] + ([("jax_plain", True)] if args.plain else []):
        with jax.set_mesh(data_mesh):  # built and lowered under our mesh, whatever mesh a caller set globally
          jax_facts, jax_run = jax_case(args, data_mesh, plain=plain)
        runners.append((dict(framework=framework, **jax_facts), jax_run))
      jax_cases = len(runners)
      runners += torch_runners(args, mode) if args.compare_torch else []
    timed = [(facts, run) for facts, run in runners if run is not None]
    cpu_times = [[] for _ in timed]
    with _maybe_trace(args.trace):
      all_times = interleaved_times([run for _, run in timed], warmup=args.warmup, runs=args.runs,
                                    cpu_times=cpu_times)
    for (facts, _), times, cpu in zip(timed, all_times, cpu_times):
      facts.update(throughput(times, args.batch))
      # Host cores kept busy per step: on a CPU backend, what of the cores' time the framework puts to use
      # (spinning worker threads count as busy).
      facts["cpu_time_s"] = _stats(cpu)
      facts["host_cores_busy"] = statistics.median(cpu) / facts["step_time_s"]["median"]
    ours, theirs = [facts for facts, _ in timed[:jax_cases]], [facts for facts, _ in timed[jax_cases:]]
    for facts in ours:  # the process's peak: with --plain, over both JAX programs
      facts["peak_memory_bytes"] = _backend_peak_bytes()
    for facts in theirs:
      facts["peak_memory_bytes"] = _torch_peak_bytes()
    if mode == "train" and args.outlook_breakdown:
      ours[0]["outlook_attention"] = outlook_share(args, ours[0])
    for facts in ours:
      for other in theirs:
        facts[f"speedup_vs_{other['framework']}"] = facts["images_per_s"]["median"] / other["images_per_s"]["median"]
    cases += [_finish_case(facts, args, mode, peak) for facts, _ in runners]
  return {"machine": machine_facts(args), "matmul_peak": peak, "cases": cases}


def _maybe_trace(trace_dir: str):
  """A jax.profiler trace of the timed runs when asked for (view it in TensorBoard / Perfetto)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  return jax.profiler.trace(trace_dir) if trace_dir else contextlib.nullcontext()


def machine_facts(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  facts = {"backend": jax.default_backend(), "device_kind": jax.local_devices()[0].device_kind,
           "local_devices": jax.local_device_count(), "cpu_count": os.cpu_count(),
           "platform": platform.platform(), "jax": jax.__version__,
           "host_memory_retained": args.host_memory_retained,
           "cpu_model": cpu_xla.cpu_model() or platform.processor(),
           "cpu_dots": args.cpu_dots, "xla_compiler_options": cpu_xla.compiler_options(args.cpu_dots)}
  if args.compare_torch:
    import torch  # pylint: disable=import-outside-toplevel
    facts.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return facts


def format_table(results: dict) -> str:
  header = f"{'mode':6} {'framework':14} {'img/s med':>10} {'min':>8} {'max':>8} {'step ms':>9} " \
           f"{'compile s':>9} {'GFLOP/img':>9} {'MFU':>6} {'ratio':>6}"
  lines = [header, "-" * len(header)]
  for c in results["cases"]:
    if "error" in c:
      lines.append(f"{c['mode']:6} {c['framework']:14} {c['error']}")
      continue
    ips = c["images_per_s"]
    ratio = c.get("speedup_vs_torch_eager", c.get("speedup_vs_torch_pil"))
    flops = c.get("flops_per_image")
    lines.append(
        f"{c['mode']:6} {c['framework']:14} {ips['median']:10.2f} {ips['min']:8.2f} {ips['max']:8.2f} "
        f"{c['step_time_s']['median'] * 1e3:9.1f} "
        f"{c['compile_time_s'] if c.get('compile_time_s') is not None else float('nan'):9.1f} "
        f"{flops / 1e9 if flops else float('nan'):9.2f} "
        f"{c['mfu'] if c.get('mfu') is not None else float('nan'):6.1%} "
        f"{ratio if ratio else float('nan'):6.2f}")
  machine = results["machine"]
  if machine["backend"] == "cpu":
    options = machine["xla_compiler_options"]
    dots = "oneDNN" if options.get("xla_cpu_use_onednn") else "YNNPACK (XLA's default)"
    lines.append(f"CPU: {machine['cpu_model'] or 'unknown'}; XLA:CPU dots in {dots}"
                 + ("" if options else ", no compile options"))
    if any(c["framework"] == "jax_plain" for c in results["cases"]):
      lines.append("jax_plain: the model without CPU kernels in a plain jax.jit (XLA's default options)")
  peak = results["matmul_peak"]
  if peak:
    scope = "per device" if peak["devices"] == 1 else f"per device, MFU against {peak['devices']}× it"
    lines.append(f"matmul peak ({peak['dtype']}, {peak['size']}², {scope}): {peak['flops_per_s'] / 1e9:.1f} "
                 f"GFLOP/s; ratio = JAX images/s ÷ PyTorch eager (input: PIL) images/s, timed in alternation")
  if any(c.get("flops_source") == "paper" and c["framework"].startswith("jax") for c in results["cases"]):
    lines.append("MFU of the scanned model from the paper's FLOPs: XLA's cost analysis counts a loop's body once")
  slides = [c for c in results["cases"] if "windows" in c]
  if slides:
    c = slides[0]
    checked = ", ".join(f"{c['framework']} {c['relative_error_vs_torch']:.1e}" for c in slides
                        if "relative_error_vs_torch" in c)
    lines.append(f"segmentation: train {c['batch']} × {c['img_size']}² crops; infer {c['batch']} images of "
                 f"{c['image_size'][0]}×{c['image_size'][1]}, {c['windows']} windows of {c['img_size']}² each "
                 f"(stride {c['stride']})" + (f"; infer logits vs PyTorch, max |Δ|/max: {checked}" if checked else ""))
  busy = [c for c in results["cases"] if "host_cores_busy" in c]
  if busy:
    lines.append("host cores busy per step (process CPU time ÷ step time): "
                 + ", ".join(f"{c['mode']} {c['framework']} {c['host_cores_busy']:.2f}" for c in busy))
  inputs = [c for c in results["cases"] if "images_per_cpu_s" in c]
  if inputs:
    per_cpu = ", ".join(f"{c['framework']} {c['images_per_cpu_s']:.1f}" for c in inputs)
    ratio = inputs[0].get("speedup_vs_torch_pil_per_cpu_s")
    lines.append(f"input images per CPU-second (all threads): {per_cpu}"
                 + (f"; ratio {ratio:.2f}" if ratio else ""))
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  results = run(args)
  print(format_table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
