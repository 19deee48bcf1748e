"""The optimizer: SGD with momentum on PyTorch's OneCycleLR, plus SWA averaging.

* `onecycle_schedules` returns learning-rate and momentum schedules that equal
  ``torch.optim.lr_scheduler.OneCycleLR`` (two phases, cosine annealing,
  momentum cycling) at every step. ``optax.cosine_onecycle_schedule`` does not:
  it puts the peak and the end one step later than PyTorch.
* `swa` is an optax ``GradientTransformation`` that keeps, from a start step
  on, the running mean of the parameters each update produces, like
  ``torch.optim.swa_utils.AveragedModel`` updated after every step.
* `create_sgd` is ``torch.optim.SGD(momentum, weight_decay)`` as optax, its
  learning rate and momentum floats or schedules; `create_optimizer` chains it,
  driven by the one-cycle schedules, with `swa`. The learning-rate finder
  (`adder.lr_find`) drives the same SGD with its own schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax


def onecycle_schedules(
    total_steps: int,
    max_lr: float,
    *,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[optax.Schedule, optax.Schedule]:
  """PyTorch's OneCycleLR (``anneal_strategy='cos'``, two phases) as schedules.

  Step ``k`` (0-based count of updates already applied) gets the value PyTorch
  uses for its ``k``-th ``optimizer.step()``: the warm-up phase ends at step
  ``pct_start * total_steps - 1`` with ``max_lr``; the last step,
  ``total_steps - 1``, gets ``max_lr / div_factor / final_div_factor``.
  Momentum moves the opposite way, from ``max_momentum`` down to
  ``base_momentum`` at the peak and back.

  Returns:
    ``(lr_schedule, momentum_schedule)``, each mapping an int step to a float32.
  """
  if total_steps < 2:
    raise ValueError(f"total_steps must be at least 2, got {total_steps}")
  if not 0.0 < pct_start < 1.0:
    raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
  initial_lr = max_lr / div_factor
  min_lr = initial_lr / final_div_factor
  # Same float arithmetic as torch: the warm-up end may be fractional.
  warm_end = float(pct_start * total_steps) - 1.0
  last = float(total_steps - 1)
  if not 0.0 < warm_end < last:
    raise ValueError(
        f"pct_start={pct_start} leaves an empty phase with total_steps={total_steps}")

  def _cos(start, end, step, begin, finish):
    # PyTorch's end + (start - end) / 2 * (cos(pi * pct) + 1), rewritten as
    # start * cos^2(pi/2 * pct) + end * sin^2(pi/2 * pct), with cos(pi/2 * pct)
    # taken as sin(pi/2 * (1 - pct)) and 1 - pct computed from the step: two
    # non-negative terms, each exact to float32 rounding. The original form
    # cancels in float32 (up to 2e-3 relative error where the lr is small).
    done = (step - begin) / (finish - begin)
    left = (finish - step) / (finish - begin)
    return (start * jnp.square(jnp.sin(math.pi / 2 * left))
            + end * jnp.square(jnp.sin(math.pi / 2 * done)))

  def _phase(step, warm_value, peak_value, end_value):
    step = jnp.asarray(step, jnp.float32)
    up = _cos(warm_value, peak_value, step, 0.0, warm_end)
    down = _cos(peak_value, end_value, step, warm_end, last)
    return jnp.where(step <= warm_end, up, down).astype(jnp.float32)

  def lr_schedule(step):
    return _phase(step, initial_lr, max_lr, min_lr)

  def momentum_schedule(step):
    return _phase(step, max_momentum, base_momentum, max_momentum)

  return lr_schedule, momentum_schedule


class SWAState(NamedTuple):
  """State of `swa`.

  Attributes:
    count: int32 scalar, number of updates seen so far.
    n_averaged: int32 scalar, number of parameter sets in ``mean``.
    mean: pytree like the params (float32), the running mean of the parameters
      after each update from ``start_step`` on; zeros before that.
  """

  count: chex.Array
  n_averaged: chex.Array
  mean: optax.Params


def swa(start_step: int) -> optax.GradientTransformation:
  """Stochastic weight averaging as an optax transform (put it last in a chain).

  Updates pass through unchanged. The state's ``mean`` averages, with equal
  weights, the parameters ``params + updates`` that result from every update
  whose 0-based index is at least ``start_step``, exactly as calling
  ``AveragedModel.update_parameters`` after each such ``optimizer.step()``.

  Args:
    start_step: index of the first update whose result is averaged; an index
      past the last update means no averaging (``n_averaged`` stays 0).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.
  """
  if not isinstance(start_step, int) or start_step < 0:
    raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")

  def init_fn(params):
    return SWAState(
        count=jnp.zeros([], jnp.int32),
        n_averaged=jnp.zeros([], jnp.int32),
        mean=jax.tree_util.tree_map(jnp.zeros_like, params),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("swa needs params: call update(updates, state, params)")
    new_params = optax.apply_updates(params, updates)
    take = state.count >= start_step
    n = state.n_averaged
    # torch: the first average is a copy, then lerp(avg, p, 1 / (n + 1)).
    weight = 1.0 / (n.astype(jnp.float32) + 1.0)

    def _avg(mean, p):
      lerped = mean + weight * (p - mean)
      new = jnp.where(n == 0, p, lerped)
      return jnp.where(take, new, mean)

    mean = jax.tree_util.tree_map(_avg, state.mean, new_params)
    return updates, SWAState(
        count=optax.safe_increment(state.count),
        n_averaged=n + take.astype(jnp.int32),
        mean=mean,
    )

  return optax.GradientTransformation(init_fn, update_fn)


def swa_state(opt_state) -> Optional[SWAState]:
  """The `SWAState` of an optimizer state made by `create_optimizer`, or None."""
  if isinstance(opt_state, tuple) and opt_state and isinstance(opt_state[-1], SWAState):
    return opt_state[-1]
  return None


def create_sgd(
    config,
    learning_rate: float | optax.Schedule,
    momentum: float | optax.Schedule,
) -> optax.GradientTransformation:
  """``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` of `config` as optax.

  The decay is added to the gradient, then the momentum trace, then the
  learning rate, as PyTorch does. Both hyperparameters are injected
  (``optax.inject_hyperparams``): a float, or a schedule of the 0-based update
  count, and their current values can be read from the state.
  """

  @optax.inject_hyperparams
  def _sgd(learning_rate, momentum):
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(decay=momentum, nesterov=config.nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )

  return _sgd(learning_rate=learning_rate, momentum=momentum)


def create_optimizer(
    config, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and weight decay on OneCycleLR, then `swa` if enabled.

  Computes the updates of ``torch.optim.SGD(lr, momentum, weight_decay)``
  stepped by OneCycleLR: the decay is added to the gradient, then the momentum
  trace, then the learning rate. The SWA averaging starts at update
  ``round(swa_start_frac * total_steps)``. With ``config.swa_lr`` set, the
  one-cycle schedules span only the updates before that, and the averaging
  phase runs at the constant ``swa_lr`` with the schedule's final momentum.

  Returns:
    ``(optimizer, lr_schedule)``; the schedule is for logging.
  """
  total_steps = config.epochs * steps_per_epoch
  swa_start = swa_start_step(config, total_steps)
  constant_phase = config.swa and config.swa_lr is not None
  lr_fn, momentum_fn = onecycle_schedules(
      swa_start if constant_phase else total_steps,
      config.lr,
      pct_start=config.pct_start,
      div_factor=config.div_factor,
      final_div_factor=config.final_div_factor,
      base_momentum=config.base_momentum,
      max_momentum=config.max_momentum,
  )
  if constant_phase:
    lr_fn = optax.join_schedules([lr_fn, optax.constant_schedule(config.swa_lr)], [swa_start])
    momentum_fn = optax.join_schedules(
        [momentum_fn, optax.constant_schedule(config.max_momentum)], [swa_start])

  tx = create_sgd(config, lr_fn, momentum_fn)
  if config.swa:
    tx = optax.chain(tx, swa(swa_start))
  return tx, lr_fn


def swa_start_step(config, total_steps: int) -> int:
  """Index of the first update averaged by SWA for this config."""
  return int(round(config.swa_start_frac * total_steps))
