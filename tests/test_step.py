"""Loss and train step: label-smoothed cross-entropy against timm's, and one real step's AdamW and EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from torch_reference import torch
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402  pylint: disable=wrong-import-order
from configs import digits
from volo_jax.train import optim, step as step_lib
from volo_jax.train.loop import build_model


def test_label_smoothed_cross_entropy_equals_timm():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((16, 1000)).astype(np.float32) * 3
  labels = rng.integers(0, 1000, 16)
  expected = LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
  ours = step_lib.cross_entropy(jnp.asarray(logits), step_lib.soft_targets(jnp.asarray(labels), 1000, 0.1))
  assert float(ours) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mixup_alpha,cutmix_alpha", [(0.0, 0.0), (0.8, 1.0)])
def test_train_step_applies_adamw_and_ema(mixup_alpha, cutmix_alpha):
  config = digits.get_config()
  config.mixup.mixup_alpha, config.mixup.cutmix_alpha = mixup_alpha, cutmix_alpha
  config.ema_decay = 0.9
  config.model.drop_path_rate = 0.1
  model = build_model(config, num_classes=10)
  graphdef, params, batch_stats, rng_template = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = step_lib.initial_state(params, batch_stats, tx, ema=True)
  batch = {"image": jax.random.normal(jax.random.key(1), (4, 32, 32, 3)), "label": jnp.arange(4)}
  train_step = jax.jit(step_lib.make_train_step(graphdef, rng_template, tx, config, 10))
  new, metrics = train_step(state, batch)
  assert int(new["step"]) == 1 and np.isfinite(float(metrics["loss"]))
  # AdamW's first step moves every trainable tensor by about lr (warmup_lr at epoch 0).
  moved = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), new["params"], params)
  assert max(float(x) for x in jax.tree.leaves(moved)) == pytest.approx(config.schedule.warmup_lr, rel=0.2)
  ema = jax.tree.map(lambda old, p: 0.9 * old + 0.1 * p, params, new["params"])
  for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(new["ema_params"])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  # The same step twice draws the same drop-path masks (keys come from (seed, step)): identical results.
  again, _ = train_step(state, batch)
  for x, y in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(again["params"])):
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_step_leaves_the_state_unchanged_and_counts_it():
  config = digits.get_config()
  config.ema_decay = 0.9
  model = build_model(config, num_classes=10)
  graphdef, params, batch_stats, rng_template = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  tx = optim.make_optimizer(config, steps_per_epoch=10)
  state = step_lib.initial_state(params, batch_stats, tx, ema=True)
  expected = jax.tree.map(np.asarray, state)
  batch = {"image": jnp.full((4, 32, 32, 3), jnp.nan), "label": jnp.arange(4)}
  new, metrics = jax.jit(step_lib.make_train_step(graphdef, rng_template, tx, config, 10))(state, batch)
  assert not np.isfinite(float(metrics["loss"])) and int(new["skipped_batches"]) == 1 and int(new["step"]) == 1
  for key in step_lib.GUARDED:
    for x, y in zip(jax.tree.leaves(expected[key]), jax.tree.leaves(new[key])):
      np.testing.assert_array_equal(x, y)

