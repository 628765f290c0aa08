"""Pure step functions: the loss, one jitted-able train step (forward, backward, AdamW, EMA) and the eval step.

The train state is a dict of pytrees: step, params (nnx.State of Params), batch_stats (BatchNorm running
statistics), opt_state, skipped_batches (steps whose loss or gradient was not finite) and optionally ema_params.
Random streams are not state: every step derives fresh keys from (seed, step), so a resumed run draws exactly what
an uninterrupted one would.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from volo_jax.train import mixup, token_label_targets


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """timm's label smoothing: 1 − s + s/K on the label, s/K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over rows of −Σ t·log_softmax(z), in float32."""
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1).mean()


def fresh_rng_state(template: nnx.State, key: jax.Array) -> nnx.State:
  """Every RNG stream of the model (dropout, drop path, MixToken) reseeded with its own key from `key`; the
  stacked streams of a scanned block stack, shape (layers,), get one key per layer."""
  flat = nnx.to_flat_state(template)
  leaves = {}
  for index, (path, var) in enumerate(flat):
    if isinstance(var, nnx.RngKey):
      stream_key = jax.random.fold_in(key, index)
      leaves[path] = var.replace(jax.random.split(stream_key, var.shape) if var.shape else stream_key)
    else:  # RngCount
      leaves[path] = var.replace(jnp.zeros_like(var.get_value()))
  return nnx.from_flat_state(leaves)


GUARDED = ("params", "batch_stats", "opt_state", "ema_params")  # what a non-finite step leaves unchanged


def initial_state(params: nnx.State, batch_stats: nnx.State, tx: optax.GradientTransformation, *,
                  ema: bool = False) -> dict:
  """The train state at step 0 for these weights: what make_train_step's step consumes and returns."""
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
           "opt_state": tx.init(params), "skipped_batches": jnp.zeros((), jnp.int32)}
  if ema:
    state["ema_params"] = params
  return state


def classification_loss(config, num_classes: int):
  """(model, batch, step_key) → (loss, {'accuracy'}): label-smoothed cross-entropy, or token labeling's loss, on
  mixed-up images when mixup/cutmix is on; batch = {'image': (B, H, W, 3) float32, 'label': (B,) int32}, and
  with token labeling the label maps, crop boxes and flips that token_label_targets.build_targets turns into
  targets."""
  smoothing = config.label_smoothing
  tl = config.token_label
  mix_config = config.mixup
  mixing = mix_config.mixup_alpha > 0 or mix_config.cutmix_alpha > 0

  def loss_fn(model, batch, step_key):
    images = batch["image"]
    if tl.enabled:
      targets = token_label_targets.build_targets(batch, num_classes=num_classes, token_size=tl.size,
                                                  smoothing=smoothing, transposed_box=tl.transposed_box)
    else:
      targets = soft_targets(batch["label"], num_classes, smoothing)
    if mixing:
      mix_key = jax.random.fold_in(step_key, 2**31 - 1)  # beyond any RNG-stream index
      images, targets = mixup.mix(mix_key, images, targets, **mix_config.to_dict())
    if tl.enabled:
      logits, aux, box = model.forward_train(images)
      loss = token_label_targets.token_label_loss(logits, aux, box, targets, dense_weight=tl.dense_weight,
                                                  cls_weight=tl.cls_weight, ground_truth=tl.ground_truth)
    else:
      logits = model(images)
      loss = cross_entropy(logits, targets)
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}

  return loss_fn


def make_train_step(graphdef, rng_template, tx: optax.GradientTransformation, config, num_classes: int,
                    loss_fn=None):
  """(state, batch) → (state, metrics {'loss', 'accuracy', 'grad_norm', 'skipped_batches'}).

  loss_fn(model, batch, step_key) → (loss, {'accuracy'}) on the merged model in train mode; default:
  classification_loss. The model's random streams and the loss's draws derive from (seed, step).
  """
  loss_fn = loss_fn or classification_loss(config, num_classes)
  ema_decay = config.ema_decay
  base_key = jax.random.key(config.seed)

  def train_step(state, batch):
    step_key = jax.random.fold_in(base_key, state["step"])
    rng_state = fresh_rng_state(rng_template, step_key)
    # The forward writes the running statistics into the BatchStat variables it was merged from: copy the inputs
    # first, for the non-finite guard below.
    before = jax.tree.map(lambda x: x, {k: state[k] for k in GUARDED if k in state})
    model = nnx.merge(graphdef, state["params"], state["batch_stats"], rng_state)
    model.train()
    (loss, aux_metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, step_key)  # Param grads
    batch_stats = nnx.state(model, nnx.BatchStat)  # running statistics updated by the forward
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      updated = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
      if "ema_params" in state:
        updated["ema_params"] = optax.incremental_update(params, state["ema_params"], 1.0 - ema_decay)
      return updated

    # A non-finite loss or gradient leaves the state as it was (the host stops or counts the skip, per config).
    # A cond, not a select per leaf: the update then runs in place, with no extra pass over the state.
    updated = jax.lax.cond(finite, update, lambda: before)
    skipped = state["skipped_batches"] + jnp.where(finite, 0, 1).astype(state["skipped_batches"].dtype)
    new_state = dict(state, step=state["step"] + 1, skipped_batches=skipped, **updated)
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped_batches": skipped, **aux_metrics}
    return new_state, metrics

  return train_step


def eval_model(graphdef, rng_template, state, use_ema: bool = False):
  """The state's model (its EMA parameters when use_ema) in eval mode, for an eval step."""
  params = state["ema_params"] if use_ema else state["params"]
  rng_state = fresh_rng_state(rng_template, jax.random.key(0))  # unused in eval, but part of the graph
  model = nnx.merge(graphdef, params, state["batch_stats"], rng_state)
  model.eval()
  return model


def make_eval_step(graphdef, rng_template, use_ema: bool = False):
  """(state, batch) → summed counts {'top1', 'top5', 'count'}; padded examples carry mask 0."""

  def eval_step(state, batch):
    logits = eval_model(graphdef, rng_template, state, use_ema)(batch["image"])
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = top5 == batch["label"][:, None]
    mask = batch["mask"]
    return {"top1": (hits[:, 0] * mask).sum(), "top5": (hits.any(-1) * mask).sum(), "count": mask.sum()}

  return eval_step
