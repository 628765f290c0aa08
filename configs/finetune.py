"""Transfer to your own images: pretrained VOLO weights fine-tuned on a small dataset (a `volo_jax.data.folder`
TFDS dataset or any TFDS image-classification dataset), selected by model argument (default volo_d1_224).

  python -m volo_jax.data.folder IMAGES_DIR --name my_flowers --data-dir DATA
  python train.py --config configs/finetune.py:volo_d1_224 --workdir DIR --config.data.dataset=my_flowers \
    --config.data.data_dir=DATA --config.init_from=hf-hub:timm/volo_d1_224.sail_in1k

The official fine-tune recipe (AdamW, weight decay 1e-8, cosine to a low floor, the variant's drop path) scaled to
a small dataset: batch 64, lr 1e-4 with one warmup epoch, 30 epochs, no token labeling (the annotator's maps are
ImageNet's), the heads restart when the class count differs (`load_pretrained`), eval crop_pct of the released
weights (models/pretrained.py). Expected: on 5 digit classes written as a PNG/JPEG folder by
`python -m volo_jax.data.digits_folder` and fine-tuned from the embedded default's workdir (`:volo_tiny_32`, with
`--config.data.hflip=0 --config.data.randaugment=`): 100% validation top-1 (180 images), 330 steps in 2.5–3 min
on 2 CPU cores (README, "Fine-tune on your own images").
"""

from configs.common import base_config
from volo_jax.models import default_crop_pct, parse_model_name

_DROP_PATH = {"volo_d1": 0.1, "volo_d2": 0.2, "volo_d3": 0.5, "volo_d4": 0.5, "volo_d5": 0.75, "volo_tiny": 0.0}


def get_config(arg: str = "volo_d1_224"):
  variant, img_size = parse_model_name(arg)
  img_size = img_size or 224
  c = base_config()
  c.experiment = f"finetune:{arg}"
  c.finetune = True  # the trainer refuses to start without init_from
  c.init_from = ""  # hf-hub:timm/<name>, a .pth/.safetensors file, a converted directory or a training workdir
  c.batch_size = 64
  c.model.name = variant
  c.model.img_size = img_size
  c.model.drop_path_rate = _DROP_PATH[variant]
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 1e-8
  c.schedule.epochs = 30
  c.schedule.warmup_epochs = 1
  c.schedule.cooldown_epochs = 0
  c.schedule.min_lr = 1e-6
  c.schedule.per_step = True  # few steps per epoch: a smooth warmup and decay
  c.token_label.enabled = False
  c.data.dataset = ""  # --config.data.dataset=<the TFDS name>, --config.data.data_dir=<its data_dir>
  c.data.eval_split = "validation"  # the folder dataset's held-out split
  c.data.crop_pct = default_crop_pct(variant, img_size)
  c.data.shuffle_buffer = 4096
  c.log_every_steps = 20
  c.eval_every_epochs = 5
  c.checkpoint_every_steps = 500
  return c
