"""The pure training step, and one epoch of it as a single jitted ``lax.scan``.

* `TrainState`: the whole training state as one pytree (params, BatchNorm
  statistics, optimizer state with the SWA average, step).
* `train_step(state, batch) -> (state, metrics)`: one SGD update down the
  gradient of `objective` (`adder.losses`).
* `train_epoch`: one whole epoch in one jit call: the epoch's pairs drawn on
  the device (`adder.data.epoch_plan`), then a ``lax.scan`` of `train_batch`
  over them, each batch gathered (and augmented) from the uint8 images already
  there. No host work per step, on every backend. `epoch_function` jits it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import NamedSharding

from adder import augment as augment_lib
from adder import data as data_lib
from adder import losses
from adder import model as model_lib
from adder import optim
from adder.config import Config

# ``augment(key, images) -> images`` on float (B, 28, 28) pixel intensities.
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def create_augment(config: Config) -> Optional[Augment]:
  """`adder.augment.random_affine` with the config's bounds; None without augmentation."""
  if not config.augment:
    return None
  return functools.partial(augment_lib.random_affine, shift_px=config.augment_shift_px,
                           rotate_deg=config.augment_rotate_deg, scale=config.augment_scale)


class TrainState(train_state.TrainState):
  """params, opt_state and step (from Flax) plus the BatchNorm running statistics.

  ``consistency_weight`` is the loss's (`Config`'s), static like ``tx``:
  `train_step` trains whatever state it is given by its own recipe.
  """

  batch_stats: Any
  consistency_weight: float = struct.field(pytree_node=False, default=0.0)


def create_train_state(
    config: Config, rng: jax.Array, steps_per_epoch: int
) -> tuple[TrainState, optax.Schedule]:
  """A fresh TrainState for `config`, and the learning-rate schedule (for logs)."""
  model = model_lib.create_model(config)
  variables = model_lib.init_variables(model, rng)
  tx, lr_fn = optim.create_optimizer(config, steps_per_epoch)
  state = TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=tx,
      consistency_weight=config.consistency_weight,
  )
  return state, lr_fn


def make_batch(
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    numbers: jax.Array,
    augment_key: Optional[jax.Array] = None,
    *,
    augment: Optional[Augment] = None,
) -> dict[str, jax.Array]:
  """Gather a training batch on the device, augmented if `augment` is given.

  Args:
    images_u8: uint8 (N, 28, 28), the whole image set. labels: int32 (N,).
    indices: int32 (B,) into the set. numbers: int32 (B,) in 0..9.
    augment_key: the PRNG key of this batch's transforms (with `augment`).
    augment: ``augment(key, images) -> images`` on float (B, 28, 28) pixel
      intensities, e.g. `adder.augment.random_affine` with its bounds bound.

  Returns:
    ``{"image": float32 (B, 28, 28, 1) normalised, "number": int32 (B,),
    "digit": int32 (B,), "sum": int32 (B,) in 0..18}``.
  """
  digits = labels[indices]
  images = images_u8[indices].astype(jax.numpy.float32)
  if augment is not None:
    images = augment(augment_key, images)
  return {
      "image": model_lib.normalize_images(images),
      "number": numbers,
      "digit": digits,
      "sum": digits + numbers,
  }


def objective(
    state: TrainState, params: Any, batch: dict[str, jax.Array]
) -> tuple[jax.Array, tuple[Any, dict]]:
  """`train_step`'s loss at ``params``: `adder.losses.cross_entropy_loss`, plus
  ``state.consistency_weight`` times the batch's mean `adder.losses.consistency_loss`.

  Train mode: BatchNorm normalises with the batch's statistics.

  Returns:
    ``(loss, (batch_stats, metrics))``: a float32 scalar, the BatchNorm
    running statistics updated by the batch, and float32 scalars
    ``digit_loss``, ``sum_loss`` and, with a weight, ``consistency_loss``.
  """
  (digit_logits, sum_logits), updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"], batch["number"], train=True, mutable=["batch_stats"])
  loss, (digit_loss, sum_loss) = losses.cross_entropy_loss(
      digit_logits, sum_logits, batch["digit"], batch["sum"])
  metrics = {"digit_loss": digit_loss, "sum_loss": sum_loss}
  if state.consistency_weight:
    metrics["consistency_loss"] = losses.consistency_loss(
        digit_logits, sum_logits, batch["number"]).mean()
    loss = loss + state.consistency_weight * metrics["consistency_loss"]
  return loss, (updates["batch_stats"], metrics)


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One update on one batch (see `make_batch`) down the gradient of `objective`.

  Pure: the new state, and scalar metrics (``loss`` and those of `objective`).
  """
  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(
      functools.partial(objective, state), has_aux=True)(state.params, batch)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss, **metrics}


def train_batch(
    state: TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    numbers: jax.Array,
    augment_key: Optional[jax.Array] = None,
    *,
    batch_sharding: Optional[NamedSharding] = None,
    augment: Optional[Augment] = None,
) -> tuple[TrainState, dict]:
  """Gather one batch on the device (see `make_batch`) and take one `train_step`.

  Args:
    indices, numbers: int32 (B,), e.g. a row of `adder.data.epoch_plan`.
    augment_key, augment: see `make_batch`.
    batch_sharding: where the batch lives (split along the mesh's ``data``
      axis); None leaves placement to the compiler.
  """
  batch = make_batch(images_u8, labels, indices, numbers, augment_key, augment=augment)
  if batch_sharding is not None:
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  return train_step(state, batch)


def train_steps(
    state: TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    numbers: jax.Array,
    augment_keys: Optional[jax.Array] = None,
    *,
    batch_sharding: Optional[NamedSharding] = None,
    augment: Optional[Augment] = None,
) -> tuple[TrainState, dict]:
  """`train_batch` scanned over the rows of ``indices`` and ``numbers`` (steps, B).

  With `augment`, ``augment_keys`` holds one PRNG key per step (steps, ...).
  Returns the new state and per-step metrics, each float32 (steps,).
  """

  def body(state, xs):
    return train_batch(state, images_u8, labels, *xs, batch_sharding=batch_sharding,
                       augment=augment)

  return jax.lax.scan(body, state, (indices, numbers, augment_keys))


def train_epoch(
    state: TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    epoch: int | jax.Array,
    *,
    batch_size: int,
    batch_sharding: Optional[NamedSharding] = None,
    augment: Optional[Augment] = None,
) -> tuple[TrainState, dict]:
  """One epoch: the pairs of `adder.data.epoch_plan` (key, epoch), then `train_steps`.

  With `augment`, each step's transforms are drawn from its own key
  (`adder.augment.step_keys` of key, epoch). Jit it with ``batch_size``,
  ``batch_sharding`` and ``augment`` static and the state donated: ``epoch``
  is traced, so every epoch reuses one compilation.

  Returns:
    The new state and per-step metrics, each float32 (N // batch_size,).
  """
  indices, numbers = data_lib.epoch_plan(key, epoch, images_u8.shape[0], batch_size)
  keys = None if augment is None else augment_lib.step_keys(key, epoch, indices.shape[0])
  return train_steps(state, images_u8, labels, indices, numbers, keys,
                     batch_sharding=batch_sharding, augment=augment)


def epoch_function(config: Config, batch_sharding: Optional[NamedSharding]) -> Callable:
  """`train_epoch` jitted for `config`, state donated: ``fn(state, images, labels, key, epoch)``."""
  return jax.jit(functools.partial(train_epoch, batch_size=config.batch_size,
                                   batch_sharding=batch_sharding,
                                   augment=create_augment(config)),
                 donate_argnums=0)
