"""Flax NNX VOLO models."""

from volo_jax.models.volo import VARIANTS, VOLO, create_model, default_crop_pct, parse_model_name

__all__ = ["VARIANTS", "VOLO", "create_model", "default_crop_pct", "parse_model_name"]
