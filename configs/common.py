"""Defaults shared by every experiment: the official recipe's fixed parts (timm 0.4.5 / main.py defaults)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classification"  # what the one trainer runs: classification | segmentation (configs/segmentation.py)
  c.seed = 0  # parameters, data order, augmentation and dropout all derive from it
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
  c.experiment = ""  # the experiment's name, set by the config file (shown in messages)
  c.finetune = False  # a fine-tune recipe: the trainer refuses to start without init_from
  c.init_from = ""  # a .pth/.pth.tar/.safetensors file, a converted weights dir or a training workdir
  c.force_resume = False  # resume a workdir whose model config differs (e.g. another image size)
  c.total_steps = 0  # > 0 overrides (epochs + cooldown) × steps per epoch, e.g. for smoke tests
  c.nonfinite = "stop"  # a NaN/inf loss or gradient: "stop" (exit 1, last good checkpoint kept) | "skip" the batch

  # Speed on hosts whose steps run on XLA:CPU (docs/cpu.md); GPUs and TPUs ignore the group. Each is opt-out.
  c.cpu = ml_collections.ConfigDict()
  c.cpu.tune_host = True  # malloc keeps freed memory, synchronous dispatch (volo_jax/cpu/host_memory.py)
  c.cpu.dots = "auto"  # XLA:CPU's matmul library: auto (oneDNN on AVX-512) | onednn | ynnpack | default (XLA's)
  c.cpu.kernels = True  # the model's CPU-tuned backward products (volo_jax/cpu/kernels.py)

  c.model = ml_collections.ConfigDict()
  c.model.name = "volo_d1"
  c.model.img_size = 224
  c.model.drop_path_rate = 0.1  # stochastic depth, the official per-block schedule
  c.model.drop_rate = 0.0  # dropout before the class head
  c.model.pos_drop_rate = 0.0  # dropout after the position embedding
  c.model.attn_drop_rate = 0.0  # dropout on the attention weights
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params, norms, softmax, loss stay float32)
  c.model.scan_blocks = False  # stack identical blocks and nnx.scan them: one compiled block body per stack
  c.model.remat = "none"  # per-block rematerialisation: none | full | dots | dots_saveable

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1.6e-3  # peak learning rate for the global batch
  c.optimizer.b1 = 0.9  # AdamW's β1, β2 and eps
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05  # decoupled; none on 1-D tensors, pos_embed and cls_token
  c.optimizer.clip_grad = 0.0  # global-norm clipping when > 0

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"  # timm's cosine (the fields below) | poly: mmseg's, counted in steps (poly_* fields)
  c.schedule.epochs = 300  # the cosine cycle
  c.schedule.warmup_epochs = 20  # linear from warmup_lr, inside the cycle (timm's warmup_prefix=False)
  c.schedule.warmup_lr = 1e-6
  c.schedule.min_lr = 1e-5  # the cosine's floor, and the lr of the cooldown epochs
  c.schedule.cooldown_epochs = 10  # at min_lr after the cycle
  c.schedule.per_step = False  # timm steps per epoch by default; True: per step
  c.schedule.poly_power = 1.0  # poly: lr = (lr − min_lr)·(1 − step/total_steps)^power + min_lr
  c.schedule.poly_warmup_steps = 0  # poly: linear warmup over these steps, from warmup_ratio × the poly lr
  c.schedule.poly_warmup_ratio = 1e-6

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.data_dir = ""  # TFDS data_dir ("" = TFDS default; gs:// paths work)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.crop_pct = 0.96  # eval: resize the short side to img_size / crop_pct, centre crop img_size
  c.data.crop_scale = (0.08, 1.0)  # random-resized crop's area range
  c.data.crop_ratio = (3 / 4, 4 / 3)  # and aspect-ratio range
  c.data.hflip = 0.5  # horizontal flip probability
  c.data.randaugment = "rand-m9-mstd0.5-inc1"  # timm RandAugment string; "" turns it off
  c.data.random_erase = 0.25  # timm's RandomErasing probability (mode 'pixel')
  c.data.shuffle_buffer = 16_384  # examples, per data shard
  c.data.shards = 0  # independently shuffled streams of the train split (0: one per process); fixing it keeps
  #                    the data order when the process count changes, e.g. on resume

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by fsdp
  c.mesh.fsdp = 1

  # Semantic segmentation (task "segmentation"): mmseg's pipeline and test settings; the crop is model.img_size.
  c.segmentation = ml_collections.ConfigDict(dict(
      scale=(2048, 512),  # (long, short) side: the train rescale's base and the test resize, keeping the ratio
      ratio_range=(0.5, 2.0),  # train rescale: the scale times U(ratio_range)
      cat_max_ratio=0.75,  # train crop: redrawn (≤ 10 times) while one class covers more of it than this
      photometric=True,  # train: brightness, contrast, saturation, hue (each p 0.5)
      eval_canvas=(1024, 1024),  # test images (resized to the scale) are padded to this fixed shape: one compile
      eval_mode="slide",  # slide: crop windows, overlaps averaged | whole: the canvas at once (canvas = crop)
      eval_stride=341,  # slide: window stride (2/3 of the crop)
      test_scales=(1.0,),  # multi-scale test: the scale's ratios, e.g. (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
      test_flip=False,  # test on the mirrored image too and average the probabilities
      channels=512,  # UperNet decode head
      aux_channels=256,  # auxiliary FCN head on the /16 level
      head_dropout=0.1,  # before both heads' classifiers
      aux_weight=0.4,  # the auxiliary loss's weight
  ))

  c.log_every_steps = 100  # log line, TensorBoard scalars and the NaN check
  c.eval_every_epochs = 10  # 0: no evaluation
  c.eval_every_steps = 0  # > 0: evaluate every this many steps instead of every eval_every_epochs
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # the newest ones kept on disk
  c.resume_step = 0  # > 0: resume from that checkpoint, not the latest (later ones are moved aside, not deleted)
  c.on_corrupt_checkpoint = "stop"  # latest checkpoint fails its integrity check: "stop" (exit 1) | "fallback"
  return c
