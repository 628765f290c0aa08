"""Defaults shared by every experiment: the official recipe's fixed parts (timm 0.4.5 / main.py defaults)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global, over all devices and processes
  c.label_smoothing = 0.1
  # timm Mixup(mode='batch', correct_lam=True); alphas 0 = off, as in every VOLO recipe (timm's usual: 0.8 / 1.0).
  c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5))
  # Token labeling (tlt): dense targets from annotator score maps + MixToken. Off here, on in configs/imagenet.py.
  c.token_label = ml_collections.ConfigDict(dict(
      enabled=False,
      dir="",  # a directory written by `python -m volo_jax.token_labels prepare`
      size=14,  # tokens per side of the dense target: img_size / 16 (14 at 224, 24 at 384, 28 at 448, 32 at 512)
      dense_weight=0.5, cls_weight=1.0,  # TokenLabelCrossEntropy's weights in every VOLO run
      ground_truth=False,  # the fine-tunes mix the crop label with the ImageNet label (tlt's ground_truth)
      mix_token=True,  # MixToken in the model's training forward
      transposed_box=True,  # tlt samples the map over the crop box mirrored about the diagonal; False: the crop
  ))
  c.ema_decay = 0.0  # > 0 keeps an EMA of the params and evaluates it
  c.init_from = ""  # a .pth/.pth.tar/.safetensors file, a converted weights dir or a training workdir
  c.force_resume = False
  c.total_steps = 0  # > 0 overrides (epochs + cooldown) × steps per epoch, e.g. for smoke tests
  c.nonfinite = "stop"  # a NaN/inf loss or gradient: "stop" (exit 1, last good checkpoint kept) | "skip" the batch
  c.xla_cpu_dots = "auto"  # XLA:CPU's matmul library: auto (oneDNN on AVX-512 CPUs) | onednn | ynnpack

  c.model = ml_collections.ConfigDict()
  c.model.name = "volo_d1"
  c.model.img_size = 224
  c.model.drop_path_rate = 0.1
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, norms, softmax, loss stay float32)
  c.model.scan_blocks = False  # stack identical blocks and nnx.scan them: one compiled block body per stack
  c.model.remat = "none"  # per-block rematerialisation: none | full | dots | dots_saveable

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1.6e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_grad = 0.0  # global-norm clipping when > 0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.epochs = 300
  c.schedule.warmup_epochs = 20
  c.schedule.warmup_lr = 1e-6
  c.schedule.min_lr = 1e-5
  c.schedule.cooldown_epochs = 10
  c.schedule.per_step = False  # timm steps per epoch by default

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default; gs:// paths work)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.crop_pct = 0.96
  c.data.crop_scale = (0.08, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.hflip = 0.5
  c.data.randaugment = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; "" turns it off
  c.data.random_erase = 0.25
  c.data.shuffle_buffer = 16_384
  c.data.shards = 0  # independently shuffled streams of the train split (0: one per process); fixing it keeps
  #                    the data order when the process count changes, e.g. on resume

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1

  c.log_every_steps = 100
  c.eval_every_epochs = 10  # 0: no evaluation
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  return c
