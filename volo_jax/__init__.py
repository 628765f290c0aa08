"""volo_jax: VOLO (Vision Outlooker) in JAX/Flax NNX, exact to the official PyTorch model."""

from volo_jax.models import VARIANTS, VOLO, default_crop_pct
from volo_jax.convert.mapping import export_torch_weights, load_torch_weights
from volo_jax.hub import create_model, load_pretrained  # timm's names: hf-hub and released weights by name
from volo_jax.train.optim import lr_schedule

__all__ = ["VARIANTS", "VOLO", "create_model", "default_crop_pct", "export_torch_weights", "load_pretrained",
           "load_torch_weights", "lr_schedule"]
