"""The learning-rate schedule and parameter groups against timm's own scheduler and groups."""

import jax
import numpy as np
import pytest
from flax import nnx

from torch_reference import timm, torch
import timm.optim  # noqa: E402  pylint: disable=wrong-import-order
import timm.scheduler  # noqa: E402  pylint: disable=wrong-import-order
import volo_jax
from configs import imagenet
from volo_jax.train import optim

STEPS_PER_EPOCH = 1251


def _timm_epoch_lrs(config, epochs):
  s = config.schedule
  optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.optimizer.lr)
  scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=s.epochs, lr_min=s.min_lr,
                                               warmup_t=s.warmup_epochs, warmup_lr_init=s.warmup_lr,
                                               cycle_limit=1, t_in_epochs=True)
  lrs = []
  for epoch in range(epochs):
    scheduler.step(epoch)
    lrs.append(optimizer.param_groups[0]["lr"])
  return np.array(lrs)


@pytest.mark.parametrize("experiment", ["volo_d1_224", "volo_d2_224", "volo_d1_384"])
def test_lr_per_epoch_equals_timm(experiment):
  config = imagenet.get_config(experiment)
  epochs = config.schedule.epochs + config.schedule.cooldown_epochs
  expected = _timm_epoch_lrs(config, epochs)
  schedule = jax.jit(optim.lr_schedule(config, STEPS_PER_EPOCH))
  rng = np.random.default_rng(0)
  for epoch in range(epochs):  # every step of an epoch uses that epoch's lr
    for step in (epoch * STEPS_PER_EPOCH, epoch * STEPS_PER_EPOCH + rng.integers(1, STEPS_PER_EPOCH)):
      assert float(schedule(step)) == pytest.approx(expected[epoch], rel=1e-6), (experiment, epoch)


def test_lr_golden_values_of_the_spec():
  d1 = jax.jit(optim.lr_schedule(imagenet.get_config("volo_d1_224"), STEPS_PER_EPOCH))
  for epoch, lr in {0: 1.0e-6, 1: 8.095e-5, 19: 1.52005e-3, 20: 1.5826273426e-3, 150: 8.05e-4,
                    299: 1.0043590354e-5, 300: 1e-5, 309: 1e-5}.items():
    assert float(d1(epoch * STEPS_PER_EPOCH)) == pytest.approx(lr, rel=1e-6)
  fine = jax.jit(optim.lr_schedule(imagenet.get_config("volo_d1_384"), 2502))
  for epoch, lr in {0: 1.0e-6, 4: 6.6e-6, 5: 7.7320508076e-6, 29: 4.0109562093e-6}.items():
    assert float(fine(epoch * 2502)) == pytest.approx(lr, rel=1e-6)
  assert optim.total_steps(imagenet.get_config("volo_d1_224"), STEPS_PER_EPOCH) == 310 * STEPS_PER_EPOCH


def test_lr_per_step_equals_timm_t_in_epochs_false():
  config = imagenet.get_config("volo_d1_224")
  config.schedule.per_step = True
  spe = 10
  s = config.schedule
  optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=config.optimizer.lr)
  scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=s.epochs * spe, lr_min=s.min_lr,
                                               warmup_t=s.warmup_epochs * spe, warmup_lr_init=s.warmup_lr,
                                               cycle_limit=1, t_in_epochs=False)
  schedule = jax.jit(optim.lr_schedule(config, spe))
  for step in range(0, 310 * spe, 7):
    scheduler.step_update(step)
    assert float(schedule(step)) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-5)  # float32 cos


def test_weight_decay_groups_equal_timm():
  """timm's param_groups_weight_decay with VOLO.no_weight_decay(): no decay on 1-D params, pos_embed, cls_token."""
  reference = timm.create_model("volo_d1_224", pretrained=False)
  groups = timm.optim.create_optimizer_v2(reference, "adamw", lr=1e-3, weight_decay=0.05).param_groups
  names = {id(p): n for n, p in reference.named_parameters()}
  decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
  model = volo_jax.create_model("volo_d1")
  params = nnx.state(model, nnx.Param)
  mask = optim.weight_decay_mask(params)
  from volo_jax.convert.mapping import torch_name  # pylint: disable=import-outside-toplevel
  ours = {torch_name(path) for path, leaf in nnx.to_flat_state(mask) if leaf.get_value()}
  assert ours == decayed


def _mmcv_poly_lr(step: int, *, base: float, total: int, power: float, warmup: int, ratio: float,
                  min_lr: float = 0.0) -> float:
  """mmcv 1.x PolyLrUpdaterHook.get_lr with warmup='linear' (get_warmup_lr), in float64."""
  regular = (base - min_lr) * (1 - step / total) ** power + min_lr
  if step < warmup:
    k = (1 - step / warmup) * (1 - ratio)
    return regular * (1 - k)
  return regular


def test_poly_schedule_equals_mmcv():
  from configs import segmentation  # pylint: disable=import-outside-toplevel
  config = segmentation.get_config("ade20k_volo_d1")
  s = config.schedule
  schedule = jax.jit(optim.lr_schedule(config, steps_per_epoch=1263))
  for step in (0, 1, 700, 1499, 1500, 1501, 80_000, 159_999, 160_000):
    expected = _mmcv_poly_lr(step, base=config.optimizer.lr, total=config.total_steps, power=s.poly_power,
                             warmup=s.poly_warmup_steps, ratio=s.poly_warmup_ratio)
    assert float(schedule(step)) == pytest.approx(expected, rel=2e-6, abs=1e-12), step
  assert optim.total_steps(config, 1263) == 160_000
