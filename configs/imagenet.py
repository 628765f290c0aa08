"""Every ImageNet-1k experiment of the official VOLO README, selected by argument.

  python train.py --config configs/imagenet.py:volo_d1_224 --workdir DIR
  python train.py --config configs/imagenet.py:volo_d1_384 --workdir DIR2 --config.init_from=DIR   # fine-tune

| argument     | paper top-1 | global batch | lr     | min lr | drop path | epochs+cooldown / warmup | wd    |
|--------------|-------------|--------------|--------|--------|-----------|--------------------------|-------|
| volo_d1_224  | 84.2        | 1024         | 1.6e-3 | 1e-5   | 0.1       | 300+10 / 20              | 0.05  |
| volo_d1_384  | 85.2        | 512          | 8e-6   | 4e-6   | 0.1       | 30+10 / 5                | 1e-8  |
| volo_d2_224  | 85.2        | 1024         | 1.0e-3 | 1e-5   | 0.2       | 300+10 / 20              | 0.05  |
| volo_d2_384  | 86.0        | 384          | 8e-6   | 4e-6   | 0.2       | 30+10 / 5                | 1e-8  |
| volo_d3_224  | 85.4        | 1024         | 1.0e-3 | 1e-5   | 0.5       | 300+10 / 20              | 0.05  |
| volo_d3_448  | 86.3        | 240          | 8e-6   | 4e-6   | 0.5       | 30+10 / 5                | 1e-8  |
| volo_d4_224  | 85.7        | 1024*        | 1.0e-3*| 1e-5   | 0.5*      | 300+10 / 20              | 0.05  |
| volo_d4_448  | 86.8        | 256*         | 8e-6   | 4e-6   | 0.5*      | 30+10 / 5                | 1e-8  |
| volo_d5_224  | 86.1        | 1024*        | 1.0e-3*| 1e-5   | 0.75*     | 300+10 / 20              | 0.05  |
| volo_d5_448  | 87.0        | 128*         | 8e-6   | 4e-6   | 0.75*     | 30+10 / 5                | 1e-8  |
| volo_d5_512  | 87.1        | 128*         | 8e-6   | 4e-6   | 0.75*     | 30+10 / 5                | 1e-8  |

* not published by the authors: our choices, not the paper's. Every experiment trains with token labeling, as
the paper's numbers do (token-label size img_size/16: 14, 24, 28, 32; the fine-tunes mix in the ground truth):
pass `--config.token_label.dir=` the prepared label maps, or `--config.token_label.enabled=False` to train
without (expect about 1.6 points less). Fine-tunes start from the matching 224 run
(`--config.init_from=` a workdir, a converted directory or an official .pth.tar); pos_embed is resized bicubically
and, with another class count, the heads restart.
"""

from configs.common import base_config
from volo_jax.models import default_crop_pct

# name: (variant, img_size, global batch, lr, drop path)
_PRETRAIN = {
    "volo_d1_224": ("volo_d1", 224, 1024, 1.6e-3, 0.1),
    "volo_d2_224": ("volo_d2", 224, 1024, 1.0e-3, 0.2),
    "volo_d3_224": ("volo_d3", 224, 1024, 1.0e-3, 0.5),
    "volo_d4_224": ("volo_d4", 224, 1024, 1.0e-3, 0.5),
    "volo_d5_224": ("volo_d5", 224, 1024, 1.0e-3, 0.75),
}
_FINETUNE = {
    "volo_d1_384": ("volo_d1", 384, 512, 8e-6, 0.1),
    "volo_d2_384": ("volo_d2", 384, 384, 8e-6, 0.2),
    "volo_d3_448": ("volo_d3", 448, 240, 8e-6, 0.5),
    "volo_d4_448": ("volo_d4", 448, 256, 8e-6, 0.5),
    "volo_d5_448": ("volo_d5", 448, 128, 8e-6, 0.75),
    "volo_d5_512": ("volo_d5", 512, 128, 8e-6, 0.75),
}
EXPERIMENTS = sorted([*_PRETRAIN, *_FINETUNE])


def get_config(arg: str = "volo_d1_224"):
  if arg not in _PRETRAIN and arg not in _FINETUNE:
    raise ValueError(f"unknown experiment {arg!r}; choose one of {', '.join(EXPERIMENTS)}")
  finetune = arg in _FINETUNE
  variant, img_size, batch, lr, drop_path = (_FINETUNE if finetune else _PRETRAIN)[arg]
  c = base_config()
  c.experiment = arg
  c.finetune = finetune  # the trainer refuses to fine-tune without init_from
  c.batch_size = batch
  c.model.name = variant
  c.model.img_size = img_size
  c.model.drop_path_rate = drop_path
  c.optimizer.lr = lr
  c.data.crop_pct = default_crop_pct(variant, img_size)  # timm's eval crop for the released weights
  c.token_label.enabled = True
  c.token_label.size = img_size // 16
  c.token_label.ground_truth = finetune
  if finetune:
    c.optimizer.weight_decay = 1e-8
    c.schedule.min_lr = 4e-6
    c.schedule.epochs = 30
    c.schedule.warmup_epochs = 5
  return c
