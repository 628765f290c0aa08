"""AdamW with timm's parameter groups on timm's CosineLRScheduler (warmup, cosine, cooldown at min_lr) or, for
segmentation, mmseg's poly schedule with linear warmup, counted in steps."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

NO_DECAY_NAMES = ("pos_embed", "cls_token")  # VOLO.no_weight_decay()


def timm_cosine_lr(t, *, base_lr: float, warmup_lr: float, warmup: float, cycle: float, min_lr: float, xp=jnp):
  """timm CosineLRScheduler (one cycle, warmup_prefix=False) at time t (epochs, or steps when per-step).

  t < warmup: linear from warmup_lr; t < cycle: min_lr + ½(base − min)(1 + cos(π·t/cycle)) on the raw t, so the
  peak is never reached; afterwards (the cooldown epochs) min_lr. xp = numpy evaluates it in float64.
  """
  warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup, 1e-12)
  # ½(1 + cos x) written as cos²(x/2): no cancellation near the end of the cycle.
  cosine = min_lr + (base_lr - min_lr) * xp.cos(0.5 * math.pi * t / cycle) ** 2
  return xp.where(t < warmup, warm, xp.where(t < cycle, cosine, min_lr))


def poly_lr(step, *, base_lr: float, min_lr: float, total: int, power: float, warmup: int, warmup_ratio: float):
  """mmcv's PolyLrUpdaterHook with linear warmup at `step`: (base − min)(1 − step/total)^power + min, scaled during
  the first `warmup` steps by 1 − (1 − step/warmup)(1 − warmup_ratio)."""
  step = jnp.asarray(step, jnp.float32)
  regular = (base_lr - min_lr) * (1.0 - jnp.minimum(step, total) / total) ** power + min_lr
  warm = step / max(warmup, 1) * (1.0 - warmup_ratio) + warmup_ratio  # 1 − (1 − t/w)(1 − r), no cancellation
  return jnp.where(step < warmup, regular * warm, regular)


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """step → learning rate, equal to timm's scheduler for `config`'s recipe (mmseg's for schedule.name 'poly').

  timm steps the scheduler once per epoch by default (lr constant within an epoch): the per-epoch values are
  computed in float64 like timm's and looked up. `schedule.per_step` gives timm's t_in_epochs=False behaviour
  (warmup and cycle counted in steps), evaluated in float32.
  """
  s, lr = config.schedule, config.optimizer.lr
  if s.name == "poly":
    return functools.partial(poly_lr, base_lr=lr, min_lr=s.min_lr, total=config.total_steps, power=s.poly_power,
                             warmup=s.poly_warmup_steps, warmup_ratio=s.poly_warmup_ratio)
  per_step = s.per_step
  scale = steps_per_epoch if per_step else 1
  kwargs = dict(base_lr=lr, warmup_lr=s.warmup_lr, warmup=s.warmup_epochs * scale, cycle=s.epochs * scale,
                min_lr=s.min_lr)
  if per_step:
    return lambda step: timm_cosine_lr(jnp.asarray(step, jnp.float32), **kwargs)
  epochs = s.epochs + s.cooldown_epochs
  table = jnp.asarray(timm_cosine_lr(np.arange(epochs + 1, dtype=np.float64), xp=np, **kwargs), jnp.float32)
  return lambda step: table[jnp.minimum(jnp.floor_divide(step, steps_per_epoch), epochs)]


def total_steps(config, steps_per_epoch: int) -> int:
  """config.total_steps when set (the poly schedule's length), else epochs + cooldown epochs, as the official
  trainer runs."""
  if config.total_steps:
    return config.total_steps
  return (config.schedule.epochs + config.schedule.cooldown_epochs) * steps_per_epoch


def weight_decay_mask(params):
  """timm's groups: decay every tensor with ≥ 2 dims except pos_embed and cls_token."""
  def decays(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """optax AdamW (decoupled decay, config.optimizer's betas and eps) on the schedule, optional global-norm clipping."""
  o = config.optimizer
  adamw = optax.adamw(lr_schedule(config, steps_per_epoch), b1=o.b1, b2=o.b2, eps=o.eps,
                      weight_decay=o.weight_decay, mask=weight_decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.clip_grad), adamw) if o.clip_grad > 0 else adamw
