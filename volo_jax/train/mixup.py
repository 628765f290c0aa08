"""timm's batch-mode Mixup/CutMix on the global batch, inside the jitted step (mixing partner: the batch
reversed, as timm's x.flip(0)). Off in every VOLO recipe; `config.mixup` turns it on."""

import jax
import jax.numpy as jnp


def cutmix_box(key, height: int, width: int, lam):
  """timm rand_bbox: an int(side·√(1−λ)) cut around a uniform centre (low edge c − cut//2, high edge
  c + (cut+1)//2), clipped. Returns (top, bottom, left, right)."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  row_key, col_key = jax.random.split(key)
  cy = jax.random.randint(row_key, (), 0, height)
  cx = jax.random.randint(col_key, (), 0, width)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width))


def apply_cutmix(images, box):
  """Paste the reversed batch into `box` with a select (no scatter); λ corrected to the kept area."""
  top, bottom, left, right = box
  _, height, width, _ = images.shape
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  mixed = jnp.where(inside[None, :, :, None], images[::-1], images)
  return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)


def mix(key, images, targets, *, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
        switch_prob: float = 0.5):
  """(images (B,H,W,C), soft targets (B,K) or a pytree of (B, ...) targets) → mixed pair, as timm
  Mixup(mode='batch', correct_lam=True); token-label targets are all mixed with the same λ, as tlt's
  TokenLabelMixup does (its CutMix does not move the token labels with the pasted box)."""
  apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  cut_images, cut_lam = apply_cutmix(images, cutmix_box(box_key, images.shape[1], images.shape[2], lam_cutmix))
  blended = lam_mixup * images + (1.0 - lam_mixup) * images[::-1]
  lam = jnp.where(use_cutmix, cut_lam, lam_mixup)
  mixed = jnp.where(use_cutmix, cut_images, blended)
  applied = jax.random.uniform(apply_key) < prob
  lam = jnp.where(applied, lam, 1.0)
  mixed = jnp.where(applied, mixed, images)
  return mixed, jax.tree.map(lambda t: lam * t + (1.0 - lam) * t[::-1], targets)
