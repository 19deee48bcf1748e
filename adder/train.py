"""Training: a TrainState pytree through a pure, jitted epoch; evaluation; the CLI.

``python -m adder.train [flags]`` parses flags into an `adder.config.Config` and
calls `train_and_evaluate`. Everything else here is importable:

* `train_step(state, batch) -> (state, metrics)`: one SGD update on a batch,
  down the gradient of `objective` (`cross_entropy_loss` plus the state's
  share of `consistency_loss`).
* `train_epoch`: one whole epoch in one jit call: the epoch's pairs drawn on
  the device (`adder.data.epoch_plan`), then a ``lax.scan`` of `train_batch`
  over them, each batch gathered from the uint8 images already there. No host
  work per step, on every backend.
* `eval_step` / `evaluate`: large jitted batches over fixed (image, integer)
  pairs: predictions, scores and the loss.
* `recompute_batch_stats`: BatchNorm statistics for averaged weights (and,
  after augmented training, the final ones), as
  ``torch.optim.swa_utils.update_bn`` computes them.

`train_and_evaluate` reads as its phases: `saved_run` (what the workdir holds),
`setup`, `resume`, `train_epochs` (`run_epoch`, `save_state` and the
TensorBoard events of `adder.tensorboard` per epoch),
`final_weight_sets`, `final_evaluation`, `write_checkpoint_and_plots`.

Every epoch's end is saved in ``<workdir>/state/`` (`adder.checkpoint`): the
TrainState (params, batch_stats, opt_state with the SWA average, step), the
epoch and the metrics rows. The data key is not stored: it is derived from
``config.seed``, which must match. Running again on the same workdir resumes
from there.

A run of several processes (`initialize_distributed`) runs all of this in
every process, in step: the jitted calls and orbax's saves and restores are
collective. Only process 0 prints and writes the plain files; the waits for
another process are bounded (`DISTRIBUTED_TIMEOUTS`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import serialization, struct
from flax.training import train_state
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adder import augment as augment_lib
from adder import checkpoint
from adder import conv_cpu
from adder import data as data_lib
from adder import devices
from adder import metrics as metrics_lib
from adder import model as model_lib
from adder import optim
from adder import tensorboard
from adder.config import Config, add_recipe_flags, config_from_flags, run_differences


# ``augment(key, images) -> images`` on float (B, 28, 28) pixel intensities.
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def create_augment(config: Config) -> Optional[Augment]:
  """`adder.augment.random_affine` with the config's bounds; None without augmentation."""
  if not config.augment:
    return None
  return functools.partial(augment_lib.random_affine, shift_px=config.augment_shift_px,
                           rotate_deg=config.augment_rotate_deg, scale=config.augment_scale,
                           elastic_px=config.augment_elastic_px,
                           elastic_sigma=config.augment_elastic_sigma)


class TrainState(train_state.TrainState):
  """params, opt_state and step (from Flax) plus the BatchNorm running statistics.

  ``consistency_weight`` and ``label_smoothing`` are the loss's (`Config`'s),
  static like ``tx``: `train_step` trains whatever state it is given by its own
  recipe.
  """

  batch_stats: Any
  consistency_weight: float = struct.field(pytree_node=False, default=0.0)
  label_smoothing: float = struct.field(pytree_node=False, default=0.0)


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
      label_smoothing=config.label_smoothing,
  )
  return state, lr_fn


def head_cross_entropy(logits: jax.Array, labels: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Each case's cross-entropy against its label, smoothed by `label_smoothing`.

  Args: logits float32 (B, K); integer labels (B,) in 0..K-1; a static
    smoothing in [0, 1) (0: the one-hot target).
  Returns: float32 (B,).
  """
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def cross_entropy_loss(
    digit_logits: jax.Array, sum_logits: jax.Array, digits: jax.Array, sums: jax.Array,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean cross-entropy of the digit head plus mean cross-entropy of the sum head.

  Args: logits float32 (B, 10) and (B, 19); integer labels (B,); the static
    `label_smoothing` of both (`head_cross_entropy`).
  Returns: ``(total, (digit_loss, sum_loss))``, float32 scalars.
  """
  digit_loss = head_cross_entropy(digit_logits, digits, label_smoothing).mean()
  sum_loss = head_cross_entropy(sum_logits, sums, label_smoothing).mean()
  return digit_loss + sum_loss, (digit_loss, sum_loss)


def consistency_loss(
    digit_logits: jax.Array, sum_logits: jax.Array, numbers: jax.Array
) -> jax.Array:
  """How far the two heads disagree, each read through sum = digit + number.

  The sum head's probabilities of the ten sums the number allows (number + 0
  .. number + 9), renormalised, are a distribution over digits; the digit
  head's distribution, moved up by the number, is one over sums. Each head is
  pulled toward the other's, which is held fixed (a stop-gradient target):
  KL(sum head's digits || digit head) + KL(digit head's sums || sum head).

  Args: logits float32 (B, 10) and (B, 19); numbers int (B,) in 0..9.
  Returns: float32 (B,), each case's, >= 0; 0 where the heads agree.
  """
  possible = numbers[:, None] + jnp.arange(model_lib.NUM_DIGITS)  # (B, 10) sums
  log_digit = jax.nn.log_softmax(digit_logits)
  log_sum = jnp.take_along_axis(jax.nn.log_softmax(sum_logits), possible, axis=1)
  log_sum_as_digit = jax.nn.log_softmax(jnp.take_along_axis(sum_logits, possible, axis=1))

  def kl(log_target, log_p):  # the target held fixed
    log_target = jax.lax.stop_gradient(log_target)
    return jnp.sum(jnp.exp(log_target) * (log_target - log_p), axis=-1)

  return kl(log_sum_as_digit, log_digit) + kl(log_digit, log_sum)


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
  images = images_u8[indices].astype(jnp.float32)
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
  """`train_step`'s loss at ``params``: `cross_entropy_loss`, plus
  ``state.consistency_weight`` times the batch's mean `consistency_loss`.

  Train mode: BatchNorm normalises with the batch's statistics.

  Returns:
    ``(loss, (batch_stats, metrics))``: a float32 scalar, the BatchNorm
    running statistics updated by the batch, and float32 scalars
    ``digit_loss``, ``sum_loss`` and, with a weight, ``consistency_loss``.
  """
  (digit_logits, sum_logits), updates = state.apply_fn(
      {"params": params, "batch_stats": state.batch_stats},
      batch["image"], batch["number"], train=True, mutable=["batch_stats"])
  loss, (digit_loss, sum_loss) = cross_entropy_loss(
      digit_logits, sum_logits, batch["digit"], batch["sum"], state.label_smoothing)
  metrics = {"digit_loss": digit_loss, "sum_loss": sum_loss}
  if state.consistency_weight:
    metrics["consistency_loss"] = consistency_loss(
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


def eval_step(
    apply_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    image_index: jax.Array,
    numbers: jax.Array,
    digits: jax.Array,
    *,
    consistency_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Predictions and losses for the cases (image_index[b], numbers[b]) of digit digits[b].

  Eval mode (running BatchNorm statistics). Jit it with ``apply_fn``,
  ``consistency_weight`` and ``label_smoothing`` static; `evaluate` feeds it
  fixed-size chunks.

  Returns:
    ``(digit_pred, sum_pred, loss)``: int32 (B,) predictions, and float32 (B,)
    each case's digit plus sum cross-entropy plus ``consistency_weight`` times
    its `consistency_loss`: the mean over cases is the training loss.
  """
  digit_logits, sum_logits = apply_fn(
      variables, model_lib.normalize_images(images_u8[image_index]), numbers, train=False)
  loss = (head_cross_entropy(digit_logits, digits, label_smoothing)
          + head_cross_entropy(sum_logits, digits + numbers, label_smoothing))
  if consistency_weight:
    loss = loss + consistency_weight * consistency_loss(digit_logits, sum_logits, numbers)
  return (jnp.argmax(digit_logits, -1).astype(jnp.int32),
          jnp.argmax(sum_logits, -1).astype(jnp.int32), loss)


def batch_statistics(
    model: model_lib.AdderNet,
    params: Any,
    images_u8: jax.Array,
    indices: jax.Array,
    batch_sharding: Optional[NamedSharding] = None,
) -> Any:
  """Per-layer BatchNorm statistics (mean, unbiased var) of one batch, train mode.

  Args: indices int32 (B,) into ``images_u8`` uint8 (N, 28, 28).
  Returns: a ``batch_stats`` pytree for `model`.
  """
  probe = model.clone(bn_momentum=0.0)  # running stats := this batch's
  template = jax.eval_shape(
      functools.partial(model_lib.init_variables, model), jax.random.PRNGKey(0))
  stats = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), template["batch_stats"])
  images = model_lib.normalize_images(images_u8[indices])
  if batch_sharding is not None:
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
  _, updates = probe.apply(
      {"params": params, "batch_stats": stats}, images,
      jnp.zeros(indices.shape, jnp.int32), train=True, mutable=["batch_stats"])
  return updates["batch_stats"]


def recompute_batch_stats(
    model: model_lib.AdderNet,
    params: Any,
    images_u8: jax.Array,
    indices: jax.Array,
    batch_sharding: Optional[NamedSharding] = None,
) -> Any:
  """BatchNorm running statistics for `params`, as ``update_bn`` computes them.

  Each batch's statistics come from a forward pass in training mode (mean and
  unbiased variance); the result is their plain average over the batches
  (PyTorch's cumulative average, ``momentum=None``), accumulated in a
  ``lax.scan``. The integer input does not reach any BatchNorm layer, so zeros
  stand in for it. Jit it with `model` and ``batch_sharding`` static.

  Args:
    indices: int32 (steps, B), the batches of images to use.

  Returns:
    A ``batch_stats`` pytree for `model`.
  """

  def body(avg, xs):
    k, batch_idx = xs
    stats = batch_statistics(model, params, images_u8, batch_idx, batch_sharding)
    return jax.tree_util.tree_map(lambda a, s: a + (s - a) / (k + 1), avg, stats), None

  shapes = jax.eval_shape(functools.partial(batch_statistics, model),
                          params, images_u8, indices[0])
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  steps = jnp.arange(indices.shape[0], dtype=jnp.float32)
  avg, _ = jax.lax.scan(body, zeros, (steps, indices))
  return avg


# One jitted recompute: the final and the averaged weights share its compilation.
_recompute_batch_stats_jit = jax.jit(recompute_batch_stats, static_argnums=0,
                                     static_argnames="batch_sharding")


def evaluate(
    eval_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    labels: np.ndarray,
    image_index: np.ndarray,
    numbers: np.ndarray,
    batch_size: int,
    sharding: Optional[NamedSharding] = None,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
  """Metrics (see `adder.metrics`), the mean loss and host predictions over fixed cases.

  The cases go through ``eval_fn`` (a jitted `eval_step`) in chunks of
  ``batch_size``, the last one padded so that it compiles once. With a
  ``sharding``, each chunk is split along it (its size must divide).

  Returns:
    ``(scores, (digit_pred, sum_pred))``: the metrics plus ``loss`` (the mean
    over the cases of the training loss, in eval mode), and int32 (N,)
    predictions.
  """
  m = len(image_index)
  pad = -m % batch_size
  chunks = [np.pad(x, (0, pad)).reshape(-1, batch_size)
            for x in (image_index, numbers, labels[image_index])]
  if sharding is not None:
    chunks = [shard(list(x), sharding) for x in chunks]
  outs = [eval_fn(variables, images_u8, *chunk) for chunk in zip(*chunks)]
  digit_pred, sum_pred, loss = (np.concatenate(x)[:m] for x in zip(*to_host(outs)))
  scores = metrics_lib.compute_metrics(digit_pred, sum_pred, labels[image_index], numbers)
  scores["loss"] = float(np.mean(loss, dtype=np.float64))
  return scores, (digit_pred, sum_pred)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays, identical on every process, as global arrays laid out by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays, identical on every process, as global arrays split by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]), tree)


def to_host(tree: Any) -> Any:
  """Fully replicated (or local) arrays as numpy, on any process."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def is_main_process() -> bool:
  """Only process 0 prints and writes the plain files (metrics, results, plots).

  Orbax writes the checkpoints from process 0 too, but every process calls its
  saves and restores, which are collective.
  """
  return jax.process_index() == 0


def _log(*args) -> None:
  if is_main_process():
    print(*args, flush=True)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process: for a choice that decides a collective call.

  A collective (an orbax save) that some processes call and others do not
  never ends; a choice made from each process's own clock could differ.
  """
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def preempted(epoch: int) -> bool:
  """Whether a run of several processes stops after `epoch`, as one of them got SIGTERM.

  There, JAX's preemption notifier takes SIGTERM over from Python (and from
  `Terminated`), tells every process, and this answers True on all of them
  after the same epoch. Every process calls it after every epoch; False for a
  single process.
  """
  return multihost_utils.reached_preemption_sync_point(epoch)


def wait_for_every_process(name: str) -> None:
  """Block until every process has called this with the same `name` (collective)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"adder.train: {name}")


class Setup(NamedTuple):
  """What every epoch and the final evaluation need, made once by `setup`."""

  mesh: Mesh
  batch_sharding: NamedSharding  # batches split along ``data``
  train_x: jax.Array  # uint8 (60000, 28, 28), replicated on every device
  train_y: jax.Array  # int32 (60000,)
  test_x: jax.Array  # uint8 (10000, 28, 28)
  test_y: np.ndarray  # int32 (10000,), on the host for the metrics
  model: model_lib.AdderNet
  lr_fn: optax.Schedule
  data_key: jax.Array  # keys every epoch's plan with fold_in(data_key, epoch)
  steps_per_epoch: int
  epoch_fn: Callable  # `epoch_function`: jitted `train_epoch`
  evaluate: Callable  # `evaluate` with a jitted `eval_step`, over test_x / test_y


def epoch_function(config: Config, batch_sharding: Optional[NamedSharding]) -> Callable:
  """`train_epoch` jitted for `config`, state donated: ``fn(state, images, labels, key, epoch)``.

  Epochs that `Config.augments_epoch` leaves plain run a second compilation
  without the transforms; an epoch's plan is the same either way.
  """
  def jitted(augment):
    return jax.jit(functools.partial(train_epoch, batch_size=config.batch_size,
                                     batch_sharding=batch_sharding, augment=augment),
                   donate_argnums=0)

  augmented = jitted(create_augment(config))
  if not config.augment or not config.plain_last_epochs:
    return augmented
  plain = jitted(None)

  def epoch_fn(state, images_u8, labels, key, epoch: int):
    fn = augmented if config.augments_epoch(epoch) else plain
    return fn(state, images_u8, labels, key, epoch)

  return epoch_fn


def check_batch_size(batch_size: int, n_dev: int) -> None:
  """The global batch must split evenly over the ``data`` axis."""
  if batch_size % n_dev:
    raise ValueError(f"batch size {batch_size} does not divide over {n_dev} devices; "
                     f"use a multiple of {n_dev}")


def check_batch_fits(batch_size: int, num_images: int) -> None:
  """An epoch needs at least one full batch of the training images."""
  if batch_size > num_images:
    raise ValueError(f"batch size {batch_size} exceeds the {num_images} training images")


def setup(config: Config, dataset: dict[str, np.ndarray]) -> tuple[Setup, TrainState]:
  """Mesh, data on the devices, the jitted functions, and the initial state."""
  mesh = devices.create_mesh()
  n_dev = mesh.size
  check_batch_size(config.batch_size, n_dev)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  # Every process holds the whole (small) dataset on each device; each batch is
  # gathered inside the step and split along the `data` axis, so a device
  # only computes on its shard and BatchNorm sees the global batch.
  train_x, train_y, test_x = replicate(
      (dataset["train_images"], dataset["train_labels"], dataset["test_images"]), replicated)
  check_batch_fits(config.batch_size, train_x.shape[0])
  steps_per_epoch = train_x.shape[0] // config.batch_size

  init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state, lr_fn = create_train_state(config, init_key, steps_per_epoch)
  model = model_lib.create_model(config)
  epoch_fn = epoch_function(config, batch_sharding)
  # Evaluation chunks split along `data` too; the outputs come back replicated.
  eval_fn = jax.jit(functools.partial(eval_step, model.apply,
                                      consistency_weight=config.consistency_weight,
                                      label_smoothing=config.label_smoothing),
                    out_shardings=replicated)
  eval_batch = -(-config.eval_batch_size // n_dev) * n_dev
  evaluate_ = functools.partial(evaluate, eval_fn, images_u8=test_x,
                                labels=dataset["test_labels"], batch_size=eval_batch,
                                sharding=batch_sharding)
  s = Setup(mesh, batch_sharding, train_x, train_y, test_x, dataset["test_labels"], model,
            lr_fn, data_key, steps_per_epoch, epoch_fn, evaluate_)
  return s, replicate(state, replicated)


def run_epoch(
    s: Setup, state: TrainState, epoch: int, test_pairs: tuple[np.ndarray, np.ndarray]
) -> tuple[TrainState, dict[str, Any], np.ndarray]:
  """Train one epoch (one jit call), then score the test pairs: the metrics row.

  ``seconds`` is the training time alone, up to the host holding the epoch's
  losses; the evaluation after it is not counted.

  Returns:
    The new state, the metrics row, and each step's training loss, float32
    (steps_per_epoch,), on the host.
  """
  t0 = time.perf_counter()
  state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, epoch)
  losses = to_host(m["loss"])
  seconds = time.perf_counter() - t0
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(
        f"loss became {losses[~np.isfinite(losses)][0]} in epoch {epoch}; lower --lr")
  scores, _ = s.evaluate({"params": state.params, "batch_stats": state.batch_stats},
                         image_index=test_pairs[0], numbers=test_pairs[1])
  row = {"epoch": epoch, "train_loss": float(losses.mean()),
         **{f"test_{k}": v for k, v in scores.items()},
         "lr": float(s.lr_fn(int(state.step) - 1)), "seconds": seconds}
  return state, row, losses


def plain_batch_stats(config: Config, s: Setup, params: Any) -> Any:
  """BatchNorm statistics of `params` over one pass of the plain training images.

  The batches are the training set in order, ``config.batch_size`` images
  each (`recompute_batch_stats`): what ``update_bn`` does over an
  unshuffled, unaugmented loader.
  """
  indices = jnp.arange(s.steps_per_epoch * config.batch_size, dtype=jnp.int32).reshape(
      s.steps_per_epoch, config.batch_size)
  return _recompute_batch_stats_jit(s.model, params, s.train_x, indices,
                                    batch_sharding=s.batch_sharding)



def final_weight_sets(config: Config, s: Setup, state: TrainState) -> dict[str, dict]:
  """``final`` (the last iterate) and, with SWA, ``swa`` (the averaged parameters).

  The ``swa`` parameters get `plain_batch_stats`. The ``final`` parameters
  keep their running statistics, or get plain ones too where
  `Config.recomputes_final_batch_stats`.
  """
  final_stats = (plain_batch_stats(config, s, state.params)
                 if config.recomputes_final_batch_stats else state.batch_stats)
  weight_sets = {"final": {"params": state.params, "batch_stats": final_stats}}
  swa = optim.swa_state(state.opt_state)
  if swa is not None and int(swa.n_averaged) > 0:
    weight_sets["swa"] = {"params": swa.mean,
                          "batch_stats": plain_batch_stats(config, s, swa.mean)}
  return weight_sets


def final_evaluation(
    s: Setup, weight_sets: dict[str, dict], test_pairs: tuple[np.ndarray, np.ndarray]
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Scores of each weight set on the test pairs and the exhaustive set.

  Returns:
    ``({name: {"test": scores, "exhaustive": scores}}, {name: (digit_pred,
    sum_pred) on the test pairs}``; the exhaustive scores also hold
    ``joint_acc_by_number``, the joint accuracy for each integer 0..9.
  """
  ex_pairs = data_lib.exhaustive_pairs(s.test_y.shape[0])
  results, test_preds = {}, {}
  for name, variables in weight_sets.items():
    test_scores, test_preds[name] = s.evaluate(
        variables, image_index=test_pairs[0], numbers=test_pairs[1])
    ex_scores, ex_preds = s.evaluate(variables, image_index=ex_pairs[0], numbers=ex_pairs[1])
    ex_scores["joint_acc_by_number"] = metrics_lib.joint_by_number(
        *ex_preds, s.test_y[ex_pairs[0]], ex_pairs[1])
    results[name] = {"test": test_scores, "exhaustive": ex_scores}
    _log(f"{name:5s}  test joint {test_scores['joint_acc']:.4f}  exhaustive: digit "
         f"{ex_scores['digit_acc']:.4f} sum {ex_scores['sum_acc']:.4f} joint "
         f"{ex_scores['joint_acc']:.4f} consistency {ex_scores['consistency']:.4f} "
         f"sum|digit {ex_scores['sum_given_digit']:.4f}")
  return results, test_preds


def run_info(config: Config, n_params: int) -> dict[str, Any]:
  """Where and how the run ran, for ``results.json``."""
  return {
      "params": n_params,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "local_devices": jax.local_device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "cpu_devices": len(jax.local_devices(backend="cpu")),  # this process's
      "cpu_convolutions": (conv_cpu.describe() if jax.default_backend() == "cpu"
                           else None),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "config": config.to_dict(),
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "python": platform.python_version()},
  }


def write_checkpoint_and_plots(
    workdir: str,
    config: Config,
    weight_sets: dict[str, dict],
    history: list[dict],
    dataset: dict[str, np.ndarray],
    test_numbers: np.ndarray,
    test_preds: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
  """The orbax checkpoint of both weight sets, and the PNGs of the preferred one.

  Every process calls it: the save is collective (orbax writes the host arrays,
  the same on every process, from process 0 alone). Process 0 draws the plots.
  """
  checkpoint.save(os.path.join(workdir, "checkpoint"), to_host(weight_sets), config)
  if is_main_process():
    from adder import plots  # pylint: disable=g-import-not-at-top
    plots.write_all(workdir, history, dataset["test_images"], dataset["test_labels"],
                    test_numbers, *test_preds[checkpoint.preferred_weights(weight_sets)])


def _log_line(epoch: int, epochs: int, row: dict) -> str:
  return (f"epoch {epoch:2d}/{epochs}  loss {row['train_loss']:.4f}  "
          f"test loss {row['test_loss']:.4f} digit {row['test_digit_acc']:.4f} "
          f"sum {row['test_sum_acc']:.4f} joint {row['test_joint_acc']:.4f}  "
          f"lr {row['lr']:.5f}  {row['seconds']:.1f}s")


class Terminated(BaseException):
  """SIGTERM, raised in the main thread as Python raises KeyboardInterrupt for SIGINT.

  A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on
  the way swallows it. `main` installs the handler that raises it.
  """


def _raise_terminated(signum, frame) -> None:  # pylint: disable=unused-argument
  raise Terminated()


def make_workdir(workdir: str) -> None:
  """Create `workdir` (process 0); ValueError if it is a file or cannot be made."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a folder")
  if is_main_process():
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e


def saved_run(
    states: ocp.CheckpointManager, config: Config, *, restart: bool = False
) -> Optional[dict]:
  """The saved epoch to resume from: the meta of the last one in ``state/``, or None.

  With `restart`, every saved epoch is deleted first. A run saved with another
  config is refused, since resuming it would mix two runs; fields that change
  nothing computed (`adder.config.NOT_RUN_FIELDS`) may differ.

  Raises:
    ValueError: the saved run's config differs; the message names the fields.
    adder.checkpoint.CheckpointError: the saved state cannot be read.
  """
  if restart:
    checkpoint.clear_states(states)
  meta = checkpoint.latest_state_meta(states)
  if meta is None:
    return None
  differences = run_differences(Config.from_dict(meta["config"]), config)
  if differences:
    listed = "; ".join(f"{name} {saved!r} there, {now!r} here"
                       for name, (saved, now) in differences.items())
    raise ValueError(
        f"{states.directory} holds a run with another config ({listed}): give the same "
        "flags to resume it, --restart to start over, or another --workdir")
  return meta


def resume(
    config: Config,
    s: Setup,
    state: TrainState,
    states: ocp.CheckpointManager,
    saved: Optional[dict],
) -> tuple[TrainState, list[dict]]:
  """The saved epoch's TrainState and metrics rows; with nothing saved, `state` and no rows.

  The arrays are restored to the host and replicated over the mesh, as `setup`
  places a fresh state.
  """
  if saved is None:
    return state, []
  host = to_host(state)
  restored = serialization.from_state_dict(host, checkpoint.restore_state(
      states, saved["epoch"], serialization.to_state_dict(host)))
  if int(restored.step) != saved["epoch"] * s.steps_per_epoch:
    raise checkpoint.CheckpointError(
        f"the training state saved in {states.directory} after epoch {saved['epoch']} is "
        f"at step {int(restored.step)}, not {saved['epoch'] * s.steps_per_epoch}; "
        "pass --restart to start over")
  _log(f"resuming after epoch {saved['epoch']}/{config.epochs}, saved in {states.directory} "
       "(--restart starts over)")
  return replicate(restored, NamedSharding(s.mesh, P())), list(saved["history"])


def save_state(
    states: ocp.CheckpointManager,
    epoch: int,
    state: TrainState,
    history: list[dict],
    config: Config,
) -> None:
  """Start saving the TrainState, `config` and the rows so far as step `epoch` of ``state/``.

  Collective (every process calls it). The state is first copied to host
  numpy arrays, so the write that continues in the background never reads
  buffers that the next epoch, which donates the state, reuses.
  """
  host = jax.tree_util.tree_map(np.array, to_host(state))
  checkpoint.save_state(states, epoch, serialization.to_state_dict(host),
                        {"config": config.to_dict(), "history": list(history)})


def train_epochs(
    config: Config,
    s: Setup,
    state: TrainState,
    history: list[dict],
    states: ocp.CheckpointManager,
    workdir: str,
    test_pairs: tuple[np.ndarray, np.ndarray],
) -> tuple[TrainState, list[dict]]:
  """The epochs after those in `history` up to ``config.epochs``, logged and saved.

  ``metrics.jsonl`` is first rewritten from `history` (a resumed run's rows,
  each once); every epoch then appends its row, and saves its state
  (`save_state`) once ``config.save_every_s`` have passed since the last save,
  and after the last epoch. Process 0 also writes each epoch's row, per-step
  losses and learning rates as TensorBoard events (`adder.tensorboard`).

  Raises:
    KeyboardInterrupt, Terminated: stopped by a signal. The saves under way
      are finished first, and the message says which epoch is saved.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main_process():
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in history)
  events = (tensorboard.event_log(workdir, s.lr_fn, s.steps_per_epoch, len(history))
            if is_main_process() else None)
  history = list(history)
  epoch = len(history) + 1
  last_save = time.perf_counter()
  try:
    for epoch in range(len(history) + 1, config.epochs + 1):
      state, row, losses = run_epoch(s, state, epoch, test_pairs)
      history.append(row)
      due = epoch == config.epochs or time.perf_counter() - last_save >= config.save_every_s
      stop = preempted(epoch)
      if agree(due) or stop:  # process 0's clock decides: every process must join the save
        save_state(states, epoch, state, history, config)
        last_save = time.perf_counter()
      if is_main_process():
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
        events.write_epoch(row, losses)
      _log(_log_line(epoch, config.epochs, row))
      if stop:
        raise Terminated()
  except (KeyboardInterrupt, Terminated) as e:
    saved = checkpoint.wait_for_saves(states)
    kept = (f"epoch {saved} is saved in {states.directory}: run the same command again "
            "to resume" if saved else "no epoch was saved")
    raise type(e)(f"in epoch {epoch}/{config.epochs}; {kept}") from None
  finally:
    if events is not None:
      events.close()
  return state, history


def train_and_evaluate(
    config: Config,
    workdir: str,
    *,
    dataset: Optional[dict[str, np.ndarray]] = None,
    write_artifacts: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
  """Train `config` (resuming the run saved in `workdir`, if any), evaluate, write the workdir.

  Args:
    config: the run.
    workdir: receives ``metrics.jsonl``, ``results.json``, ``checkpoint/``,
      PNG plots, ``tensorboard/`` (event files, `adder.tensorboard`), and
      ``state/`` (the training state after each epoch, which a later call with
      the same config resumes from).
    dataset: arrays as returned by `adder.data.load_mnist`; None loads MNIST.
    write_artifacts: False skips checkpoint and plots (quick experiments).
    restart: delete the saved training state and start from scratch.

  Returns:
    The results dictionary also written to ``results.json``: scores, run info,
    ``train_seconds`` (the epochs' training time, over every session of a
    resumed run) and ``wall_seconds`` (this session, from the data in host
    memory to the final scores: compilation, every epoch, its evaluation and
    saving, the BatchNorm recompute and the final evaluation).

  Raises:
    ValueError: a bad batch size or workdir, or a workdir holding a run of
      another config. adder.checkpoint.CheckpointError: an unreadable saved
      state. KeyboardInterrupt, Terminated: see `train_epochs`.
  """
  _log(devices.describe())
  if jax.default_backend() == "cpu":
    _log(conv_cpu.describe())
  if config.require_gpu and jax.default_backend() != "gpu":
    raise SystemExit(
        f"error: --require-gpu: JAX sees no GPU (backend {jax.default_backend()}); "
        "install jax[cuda12] or jax[cuda13] (see README)")
  check_batch_size(config.batch_size, jax.device_count())  # before the data loads
  if dataset is None:
    check_batch_fits(config.batch_size, data_lib.SPLIT_SIZES["train"])
  make_workdir(workdir)
  with checkpoint.open_states(workdir) as states:
    saved = saved_run(states, config, restart=restart)
    if dataset is None:
      dataset = data_lib.load_mnist(config.mnist_dir, config.data_dir)

    t_start = time.perf_counter()
    s, state = setup(config, dataset)
    n_params = model_lib.count_params(state.params)
    _log(f"model: {n_params:,} parameters; {s.steps_per_epoch} steps/epoch of "
         f"{config.batch_size}, one jit call per epoch")
    test_pairs = (np.arange(s.test_y.shape[0], dtype=np.int32),
                  data_lib.test_numbers(s.test_y.shape[0], config.eval_seed))
    state, history = resume(config, s, state, states, saved)
    state, history = train_epochs(config, s, state, history, states, workdir, test_pairs)

  weight_sets = final_weight_sets(config, s, state)
  results, test_preds = final_evaluation(s, weight_sets, test_pairs)
  results.update(run_info(config, n_params))
  results["train_seconds"] = sum(r["seconds"] for r in history)
  results["wall_seconds"] = time.perf_counter() - t_start
  if is_main_process():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  if write_artifacts:
    write_checkpoint_and_plots(workdir, config, weight_sets, history, dataset,
                               test_pairs[1], test_preds)
  # The processes leave together, so that none waits at exit for process 0's
  # files (see DISTRIBUTED_TIMEOUTS).
  wait_for_every_process("done")
  return results


_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

# How long the processes of a run wait for one another, in seconds: keyword
# arguments of `jax.distributed.initialize` (the same names in JAX 0.10 and
# 0.11). Whatever happens to one process, the others end within these bounds.
DISTRIBUTED_TIMEOUTS = {
    # Every process must have joined within this of the first: hosts started
    # by hand or by a scheduler may lag (JAX's default).
    "initialization_timeout": 300,
    # A process that sends no heartbeat for this long (killed, its host lost)
    # is declared dead, and every other process is ended with an error that
    # says so (JAX's default: 100). Heartbeats come from a thread of their
    # own, so a busy or compiling process still sends them.
    "heartbeat_timeout_seconds": 60,
    # How long a finished process waits at exit for the others; past it, all
    # are ended with an error. This also bounds how long the others, blocked
    # in a collective, wait for a process that left with an error (JAX's
    # default: 300). Processes finish together: `train_and_evaluate` ends
    # with a collective, after process 0's plots.
    "shutdown_timeout_seconds": 60,
}


def _launched_processes() -> int:
  """The process count that a cluster launcher announces; 1 when none does."""
  return max(int(os.environ.get(v, "1") or 1) for v in _CLUSTER_ENV)


def initialize_distributed(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> int:
  """Join a multi-process run: with the flags, or when a cluster launcher is seen.

  With no flags, ``jax.distributed.initialize()`` is called only when a
  launcher says there are several processes (SLURM, Open MPI, MPICH/PMI) or
  ``JAX_COORDINATOR_ADDRESS`` is set; JAX then reads the rest from the
  environment. A single process needs none of this. Call it before JAX's
  backend starts, and before `adder.devices.configure_cpu_devices`, which
  needs the process count. The waits are bounded by `DISTRIBUTED_TIMEOUTS`.

  Returns:
    The number of processes in the run (1: this one alone).
  """
  if coordinator or num_processes is not None or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **DISTRIBUTED_TIMEOUTS)
    return num_processes or _launched_processes()
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or _launched_processes() > 1:
    jax.distributed.initialize(**DISTRIBUTED_TIMEOUTS)
    return _launched_processes()
  return 1


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
  """Flags -> (Config, the parsed flags). Unset flags keep `Config`'s defaults."""
  p = argparse.ArgumentParser(
      prog="python -m adder.train",
      description="Train the MNIST adder (image + integer 0-9 -> digit, sum) and "
                  "evaluate it on fixed test pairs and the exhaustive set.")
  p.add_argument("--workdir", default="runs/default",
                 help="output folder: metrics.jsonl, results.json, checkpoint/, plots, "
                      "and state/, the training state after each epoch; a run saved "
                      "there resumes (default: %(default)s)")
  p.add_argument("--restart", action="store_true",
                 help="delete the training state saved in the workdir and start over")
  p.add_argument("--save-every", type=float, default=Config().save_every_s, metavar="SECONDS",
                 help="save the training state after an epoch once this many seconds have "
                      "passed since the last save, and after the last epoch; 0: every "
                      "epoch (default: %(default)s)")
  add_recipe_flags(p)
  d = Config()
  p.add_argument("--augment-shift", type=float, default=d.augment_shift_px, metavar="PIXELS",
                 help="largest random shift of a training image along each axis "
                      "(default: %(default)s)")
  p.add_argument("--augment-rotate", type=float, default=d.augment_rotate_deg,
                 metavar="DEGREES",
                 help="largest random rotation of a training image either way "
                      "(default: %(default)s)")
  p.add_argument("--augment-scale", type=float, default=d.augment_scale, metavar="FRACTION",
                 help="largest random change of a training image's size either way, "
                      "e.g. 0.1 for 90-110%% (default: %(default)s)")
  p.add_argument("--augment-elastic", type=float, default=d.augment_elastic_px,
                 metavar="PIXELS",
                 help="standard deviation of a smooth random displacement of a training "
                      "image's pixels along each axis, an elastic distortion (0: none; "
                      "default: %(default)s)")
  p.add_argument("--augment-elastic-sigma", type=float, default=d.augment_elastic_sigma,
                 metavar="PIXELS",
                 help="smoothness of that displacement: the std of the Gaussian that "
                      "smooths its noise (default: %(default)s)")
  p.add_argument("--plain-last-epochs", type=int, default=d.plain_last_epochs, metavar="N",
                 help="train the last N epochs on the images as they are "
                      "(default: %(default)s)")
  p.add_argument("--no-augment", action="store_true",
                 help="train on the images as they are (the PyTorch reference's recipe)")
  p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, metavar="EPS",
                 help="label smoothing of both heads' cross-entropies, in [0, 1) (0: "
                      "one-hot targets; default: %(default)s)")
  p.add_argument("--running-batch-stats", action="store_true",
                 help="keep the final weights' running BatchNorm statistics (default: "
                      "after augmented training, recompute them on the plain training "
                      "images, as the SWA weights' are)")
  p.add_argument("--require-gpu", action="store_true",
                 help="refuse to train unless JAX sees a GPU")
  multi = p.add_argument_group(
      "several hosts", "one process per host; without these flags a SLURM / MPI "
      "launch or $JAX_COORDINATOR_ADDRESS is detected")
  multi.add_argument("--coordinator", default=None,
                     help="HOST:PORT of process 0, for jax.distributed.initialize")
  multi.add_argument("--num-processes", type=int, default=None, help="number of processes")
  multi.add_argument("--process-id", type=int, default=None, help="this process, 0-based")
  a = p.parse_args(argv)
  if not a.save_every >= 0:
    p.error("--save-every must be 0 or more seconds")
  for flag, value, most in (("--augment-shift", a.augment_shift, 14),
                            ("--augment-rotate", a.augment_rotate, 180),
                            ("--augment-scale", a.augment_scale, 0.5),
                            ("--augment-elastic", a.augment_elastic, 5)):
    if not 0 <= value <= most:
      p.error(f"{flag} must be between 0 and {most}")
  if not 0.5 <= a.augment_elastic_sigma <= 14:
    p.error("--augment-elastic-sigma must be between 0.5 and 14")
  if not 0 <= a.label_smoothing < 1:
    p.error("--label-smoothing must be at least 0 and less than 1")
  if not 0 <= a.plain_last_epochs <= a.epochs:
    p.error("--plain-last-epochs must be between 0 and --epochs")
  config = config_from_flags(p, a).replace(
      require_gpu=a.require_gpu, save_every_s=a.save_every,
      augment_shift_px=a.augment_shift, augment_rotate_deg=a.augment_rotate,
      augment_scale=a.augment_scale, augment_elastic_px=a.augment_elastic,
      augment_elastic_sigma=a.augment_elastic_sigma, plain_last_epochs=a.plain_last_epochs,
      plain_batch_stats=not a.running_batch_stats, label_smoothing=a.label_smoothing)
  if a.no_augment:
    config = config.without_augmentation()
  return config, a


def _leave_run(status: int) -> int:
  """`status`; in a run of several processes, end this process now with it.

  At exit `jax.distributed.shutdown` waits for every other process, and after
  a failure some never come (one has died, or they wait in a collective that
  this process has left): the wait would end in an abort only after
  `DISTRIBUTED_TIMEOUTS`. Leaving at once ends the others sooner: their next
  collective fails, or the coordinator, in process 0, goes with it.
  """
  if jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status


def main(argv: Optional[list[str]] = None) -> int:
  """The CLI. Exit status 0, 2 (an ``error:`` line), 130 (SIGINT) or 143 (SIGTERM).

  In a run of several processes, also 1 (an ``error:`` line): the JAX runtime
  failed, most often because another process has stopped.
  """
  config, args = parse_args(argv)
  in_main_thread = threading.current_thread() is threading.main_thread()
  if in_main_thread:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    processes = initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cpu_choice = devices.configure_cpu_devices(config.batch_size, processes=processes)
    if jax.default_backend() == "cpu":
      _log(cpu_choice)
    train_and_evaluate(config, args.workdir, restart=args.restart)
  except (data_lib.DataError, checkpoint.CheckpointError, FloatingPointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return _leave_run(2)
  except jax.errors.JaxRuntimeError as e:
    if not jax.distributed.is_initialized():
      raise
    # Most often a collective whose other side has gone.
    print(f"error: {(str(e).strip() or type(e).__name__).splitlines()[0]}; in a run of "
          "several processes this usually means that another process stopped: see its log",
          file=sys.stderr)
    return _leave_run(1)
  except (KeyboardInterrupt, Terminated) as e:
    name, status = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
    print(f"stopped by {name}" + (f" {e}" if str(e) else ""), file=sys.stderr)
    return status
  finally:
    if in_main_thread and previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return 0


if __name__ == "__main__":
  sys.exit(main())
