"""The embedded default: a small VOLO (`volo_tiny`, ours) on scikit-learn's real handwritten digits.

  python train.py --config configs/digits.py --workdir /tmp/volo_digits

1,437 train / 360 test images of 8×8 scans upsampled to 32×32, built into a local TFDS dataset on first use
(no download). A few minutes on a 2-core CPU to ≥ 95% test top-1.
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.batch_size = 64
  c.model.name = "volo_tiny"
  c.model.img_size = 32
  c.model.drop_path_rate = 0.0
  c.optimizer.lr = 2e-3
  c.schedule.epochs = 25
  c.schedule.warmup_epochs = 2
  c.schedule.cooldown_epochs = 0
  c.data.dataset = "volo_digits"
  c.data.eval_split = "test"
  c.data.crop_pct = 1.0
  c.data.crop_scale = (0.6, 1.0)  # digits must stay legible
  c.data.hflip = 0.0  # a mirrored digit is another symbol
  c.data.random_erase = 0.0
  c.data.randaugment = ""
  c.data.shuffle_buffer = 2048
  c.log_every_steps = 20
  c.eval_every_epochs = 5
  c.checkpoint_every_steps = 200
  return c
