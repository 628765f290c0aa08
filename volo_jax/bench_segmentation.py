"""The segmentation cases of `python -m volo_jax.bench --task segmentation`: VOLO + UperNet (150 classes, as
ADE20K) against the PyTorch composite it mirrors (timm's VOLO, our pyramid, transformers' UperNetHead and
UperNetFCNHead) loaded with the same weights.

  python -m volo_jax.bench --task segmentation --model volo_d1 --crop 512 --batch 2 --mode infer,train --compare-torch

train: the trainer's step (configs/segmentation.py:ade20k_volo_d1's recipe at --model and --crop) at batch × crop ×
crop: decode + 0.4 × aux cross-entropy (ignore 255) on random labels, AdamW (mmseg's lr 6e-5, weight decay 0.01),
drop path as the backbone's ImageNet recipe. infer: mmseg's sliding-window test of
images crop × round(crop · 4/3) (ADE20K's usual 512 × 683: two windows), stride 2/3 of the crop; ours runs every
window in one batch (`slide_logits`), PyTorch runs mmseg's loop, one window at a time. Before timing, both sides'
infer logits are compared (max |Δ| / max |theirs| ≤ 1e-4 in float32), so both compute the same numbers.

bench.py drives these cases as the classification ones: same timing, FLOP count, MFU and table.
"""

import numpy as np

from volo_jax import bench
from volo_jax.convert import segmenter as convert
from volo_jax.cpu import xla as cpu_xla

NUM_CLASSES = 150  # ADE20K
IGNORE_INDEX = 255
IGNORED_SHARE = 0.1  # labels set to IGNORE_INDEX
HEAD_CHANNELS = {"channels": 512, "aux_channels": 256}  # UperNet's and the FCN head's widths, mmseg's
MAX_RELATIVE_ERROR = {"float32": 1e-4, "bfloat16": 0.1}  # infer logits, max |Δ| / max |PyTorch's|


def infer_size(crop: int) -> tuple[int, int]:
  """The infer image: crop × round(crop · 4/3), a 4:3 landscape image resized to the crop on its short side."""
  return crop, round(crop * 4 / 3)


def infer_stride(crop: int) -> int:
  """mmseg's ADE20K slide stride, 341 for the 512 crop."""
  return crop * 2 // 3


def drop_path_rate(model_name: str) -> float:
  """The ImageNet recipe's drop path for the variant (0.1 for volo_d1), else the common default."""
  from configs import common, imagenet  # pylint: disable=import-outside-toplevel
  from volo_jax.models.volo import parse_model_name  # pylint: disable=import-outside-toplevel
  name = f"{parse_model_name(model_name)[0]}_224"
  config = imagenet.get_config(name) if name in imagenet.EXPERIMENTS else common.base_config()
  return config.model.drop_path_rate


def _images(args, height: int, width: int) -> np.ndarray:
  return np.random.default_rng(0).standard_normal((args.batch, height, width, 3)).astype("float32")


def _labels(args) -> np.ndarray:
  """(B, crop, crop) int32 classes, IGNORED_SHARE of them IGNORE_INDEX."""
  rng = np.random.default_rng(1)
  labels = rng.integers(0, NUM_CLASSES, (args.batch, args.crop, args.crop), dtype=np.int32)
  return np.where(rng.random(labels.shape) < IGNORED_SHARE, IGNORE_INDEX, labels).astype(np.int32)


def train_config(args):
  """ADE20K's recipe for --model at --crop, --dtype, --scan and --remat; EMA off."""
  from configs import segmentation  # pylint: disable=import-outside-toplevel
  config = segmentation.get_config("ade20k_volo_d1")
  m = config.model
  m.name, m.img_size, m.dtype, m.scan_blocks, m.remat = args.model, args.crop, args.dtype, args.scan, args.remat
  m.drop_path_rate = drop_path_rate(args.model)
  config.segmentation.channels = HEAD_CHANNELS["channels"]
  config.segmentation.aux_channels = HEAD_CHANNELS["aux_channels"]
  config.ema_decay = 0.0
  return config


def _jax_model(args, *, plain: bool):
  """The trainer's segmenter for train_config, initialised on the default device; with the CPU kernels unless
  `plain`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from volo_jax.cpu.kernels import use_cpu_kernels  # pylint: disable=import-outside-toplevel
  from volo_jax.train import tasks  # pylint: disable=import-outside-toplevel
  with jax.set_mesh(None):
    model = tasks.Segmentation.create_model(train_config(args), NUM_CLASSES, jnp.dtype(args.dtype))
  if bench._on_cpu() and not plain:  # pylint: disable=protected-access
    use_cpu_kernels(model, cpu_xla.dot_library(args.cpu_dots))
  return model


def jax_infer(args, mesh, *, plain: bool = False):
  """Slide inference of `batch` images, jitted over the split model state, data parallel: (facts, run, weights,
  logits): the model's state_dict and a function giving the output as numpy."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from volo_jax.models.segmenter import slide_logits, window_boxes  # pylint: disable=import-outside-toplevel
  model = _jax_model(args, plain=plain)
  model.eval()
  graphdef, state = nnx.split(model)
  height, width = infer_size(args.crop)
  stride = infer_stride(args.crop)
  images = jax.device_put(_images(args, height, width), jax.NamedSharding(mesh, jax.P("data")))
  state = jax.device_put(state, jax.NamedSharding(mesh, jax.P()))
  forward = bench._jit(lambda state, x: slide_logits(nnx.merge(graphdef, state), x, args.crop, stride),  # pylint: disable=protected-access
                       args, plain=plain)
  compiled, compile_s, flops, buffer_bytes = bench._compiled_facts(  # pylint: disable=protected-access
      forward.lower(state, images), mesh.size, scanned=args.scan)
  facts = dict(compile_time_s=compile_s, flops_per_call=flops, compiled_buffer_bytes=buffer_bytes,
               image_size=[height, width], windows=len(window_boxes(height, width, args.crop, stride)),
               stride=stride)
  return (facts, lambda: compiled(state, images).block_until_ready(), convert.state_dict(model),
          lambda: np.asarray(compiled(state, images)))


def jax_train(args, mesh, *, plain: bool = False):
  """The trainer's step (forward, backward, AdamW, non-finite guard) with donated state, data parallel over the
  local devices: (facts, run, weights, None), weights the initial state_dict, read before `run` donates it."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from volo_jax.train import optim, segmentation_step, step as step_lib  # pylint: disable=import-outside-toplevel
  config = train_config(args)
  model = _jax_model(args, plain=plain)
  graphdef, params, batch_stats, rng_template = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  tx = optim.make_optimizer(config, steps_per_epoch=1000)
  state = jax.device_put(step_lib.initial_state(params, batch_stats, tx), jax.NamedSharding(mesh, jax.P()))
  data = jax.NamedSharding(mesh, jax.P("data"))
  batch = {"image": jax.device_put(_images(args, args.crop, args.crop), data),
           "label": jax.device_put(_labels(args), data)}
  train_step = step_lib.make_train_step(graphdef, rng_template, tx, config, NUM_CLASSES,
                                       loss_fn=segmentation_step.loss_fn(config))
  step = bench._jit(train_step, args, plain=plain, donate_argnums=0)  # pylint: disable=protected-access
  compiled, compile_s, flops, buffer_bytes = bench._compiled_facts(  # pylint: disable=protected-access
      step.lower(state, batch), mesh.size, scanned=args.scan)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    metrics["loss"].block_until_ready()

  facts = dict(compile_time_s=compile_s, flops_per_call=flops, compiled_buffer_bytes=buffer_bytes,
               image_size=[args.crop, args.crop])
  weights = convert.state_dict(model)
  return facts, run, weights, None


# ------------------------------------------------------------------------------------------------- PyTorch

def torch_segmenter(args, tensors: dict[str, np.ndarray], *, train: bool):
  """The PyTorch composite with `tensors` (volo_jax.convert.segmenter.state_dict names): timm's VOLO stage maps,
  the pyramid (ConvTranspose2d 2×2 on /8, /8, /16, 2×2 max-pool of /16), transformers' UperNetHead and
  UperNetFCNHead; in training, dropout before each classifier as ours (transformers' heads have none)."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import UperNetConfig  # pylint: disable=import-outside-toplevel
  from transformers.models.upernet import modeling_upernet  # pylint: disable=import-outside-toplevel
  from volo_jax.models.volo import VARIANTS, parse_model_name  # pylint: disable=import-outside-toplevel
  variant = VARIANTS[parse_model_name(args.model)[0]]
  levels = [variant.embed_dims[0], variant.embed_dims[0], variant.embed_dims[-1], variant.embed_dims[-1]]
  config = train_config(args)
  head_config = UperNetConfig(hidden_size=HEAD_CHANNELS["channels"], pool_scales=[1, 2, 3, 6],
                         auxiliary_channels=HEAD_CHANNELS["aux_channels"], auxiliary_num_convs=1,
                         auxiliary_concat_input=False, num_labels=NUM_CLASSES)

  class Segmenter(torch.nn.Module):
    """timm VOLO → pyramid → UperNet decode head (+ FCN aux head)."""

    def __init__(self):
      super().__init__()
      self.backbone = timm.models.volo.VOLO(
          list(variant.layers), img_size=args.crop, num_classes=0, stem_hidden_dim=variant.stem_hidden_dim,
          embed_dims=list(variant.embed_dims), num_heads=list(variant.num_heads), mlp_ratio=variant.mlp_ratio,
          drop_path_rate=config.model.drop_path_rate if train else 0.0)
      self.neck = torch.nn.Module()
      self.neck.up = torch.nn.ConvTranspose2d(levels[0], levels[0], 2, stride=2)
      self.decode_head = modeling_upernet.UperNetHead(head_config, in_channels=levels)
      self.auxiliary_head = modeling_upernet.UperNetFCNHead(head_config, in_channels=levels)

    def forward(self, images):
      maps = self.backbone.forward_intermediates(images, norm=True, intermediates_only=True)
      x8, x16 = maps[0], maps[-1]
      features = [self.neck.up(x8), x8, x16, torch.nn.functional.max_pool2d(x16, 2)]
      return self.decode_head(features), self.auxiliary_head(features)

  model = Segmenter()
  weights = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}  # writable copies
  missing = model.backbone.load_state_dict(
      {k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")}, strict=False)
  assert all(k.startswith(("cls_token", "post_network.")) for k in missing.missing_keys), missing.missing_keys
  model.load_state_dict({**model.state_dict(), **weights}, strict=True)
  if train:
    for head in (model.decode_head, model.auxiliary_head):
      head.classifier = torch.nn.Sequential(torch.nn.Dropout(config.segmentation.head_dropout), head.classifier)
  return model.train(train)


def torch_slide(net, images, crop: int, stride: int, num_classes: int):
  """mmseg's slide_inference: one window at a time, its logits resized to the crop, summed, divided by the count."""
  import torch  # pylint: disable=import-outside-toplevel
  from volo_jax.models.segmenter import window_boxes  # pylint: disable=import-outside-toplevel
  b, _, height, width = images.shape
  preds = images.new_zeros((b, num_classes, height, width))
  count = images.new_zeros((1, 1, height, width))
  for y, x in window_boxes(height, width, crop, stride):
    logits, _ = net(images[:, :, y:y + crop, x:x + crop])
    preds[:, :, y:y + crop, x:x + crop] += torch.nn.functional.interpolate(logits, size=(crop, crop),
                                                                           mode="bilinear", align_corners=False)
    count[:, :, y:y + crop, x:x + crop] += 1
  return preds / count


def torch_runners(args, mode: str, tensors: dict[str, np.ndarray]) -> tuple[list[tuple[dict, callable]], callable]:
  """The composite on the same inputs, eager and torch.compile'd, as bench.torch_runners: (facts, run) pairs, and
  for infer a function giving eager's logits (B, H, W, classes) as numpy."""
  import torch  # pylint: disable=import-outside-toplevel
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  model = torch_segmenter(args, tensors, train=mode == "train").to(device)
  height, width = infer_size(args.crop) if mode == "infer" else (args.crop, args.crop)
  images = torch.from_numpy(_images(args, height, width)).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(_labels(args)).long().to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  o = train_config(args).optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                weight_decay=o.weight_decay)
  stride = infer_stride(args.crop)
  aux_weight = train_config(args).segmentation.aux_weight

  def loss_of(logits):
    logits = torch.nn.functional.interpolate(logits.float(), size=labels.shape[1:], mode="bilinear",
                                             align_corners=False)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

  def make_run(net):
    def infer():
      with torch.no_grad(), autocast:
        torch_slide(net, images, args.crop, stride, NUM_CLASSES)
      sync()

    def train():
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        logits, aux_logits = net(images)
        loss = loss_of(logits) + aux_weight * loss_of(aux_logits)
      loss.backward()
      optimizer.step()
      sync()
    return infer if mode == "infer" else train

  def eager_logits():
    with torch.no_grad(), autocast:
      return torch_slide(model, images, args.crop, stride, NUM_CLASSES).float().permute(0, 2, 3, 1).cpu().numpy()

  runners = [({"framework": "torch_eager", "compile_time_s": None}, make_run(model))]
  if not args.no_torch_compile:
    runners.append(bench.torch_compiled_runner(make_run, model))
  return runners, eager_logits


# ------------------------------------------------------------------------------------------------- driver

def runners(args, mode: str, mesh) -> tuple[list[tuple[dict, callable]], int]:
  """(facts, run) pairs for bench.run, the JAX ones first, and how many are JAX's. With --compare-torch, the
  infer logits of both sides are compared first and their relative error recorded."""
  import jax  # pylint: disable=import-outside-toplevel
  if mode not in ("infer", "train"):
    raise SystemExit(f"--task segmentation times infer and train, not {mode}")
  result, outputs, weights = [], [], []  # weights: numpy copies
  for framework, plain in [("jax", False)] + ([("jax_plain", True)] if args.plain else []):
    with jax.set_mesh(mesh):  # built and lowered under our mesh, whatever mesh a caller set globally
      facts, run, state_dict, logits = (jax_infer if mode == "infer" else jax_train)(args, mesh, plain=plain)
    result.append((dict(framework=framework, **facts), run))
    outputs.append(logits)
    weights.append(state_dict)
  jax_cases = len(result)
  if args.compare_torch:
    theirs, eager_logits = torch_runners(args, mode, weights[0])  # every JAX case has seed 0's weights
    if mode == "infer":
      reference = eager_logits()
      for (facts, _), logits in zip(result, outputs):
        error = float(np.abs(logits() - reference).max() / np.abs(reference).max())
        facts["relative_error_vs_torch"] = error
        if not error <= MAX_RELATIVE_ERROR[args.dtype]:
          raise SystemExit(f"{facts['framework']} infer logits differ from PyTorch's by {error:.2e} (max |Δ| / max)")
    result += theirs
  return result, jax_cases
