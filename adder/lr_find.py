"""The learning-rate range test ("LR finder"): ``python -m adder.lr_find``.

From a fresh model of the recipe (`adder.step.create_train_state` with the
initialisation key `adder.train.setup` derives from the seed), the recipe's
SGD (`adder.optim.create_sgd`: momentum, weight decay) takes ``steps`` updates
while the learning rate grows exponentially from ``min_lr`` to ``max_lr``
(`exponential_schedule`). The batches are the first ones training draws
(`training_plan`: the epoch plans of epochs 1, 2, ... from the same data key,
augmented as the recipe augments), and every step runs in one jit call of
`adder.step.train_steps`, the scan of `adder.step.train_batch` that each
training epoch runs. Then, on the host, as PyTorch Lightning's
``Tuner.lr_find`` and fastai's ``lr_find`` do:

* `smooth`: each step's loss as an exponential moving average (``beta``
  0.98) with bias correction;
* `divergence_index`: the curve ends at the first step, after the first, whose
  smoothed loss exceeds 4x the lowest before it (the scan runs every step; the
  host cuts where Lightning would have stopped);
* `suggest`: the learning rate where the smoothed loss falls fastest against
  log(lr), the first 10 points and the last one left out.

Where this differs from Lightning (2.x, ``lightning/pytorch/tuner/lr_finder.py``):

* the schedule is ``min_lr * (max_lr / min_lr) ** (k / (steps - 1))`` for
  step ``k``, so the first step uses ``min_lr`` and the last ``max_lr``
  (Lightning's ``_ExponentialLR`` skips one value after the first step);
* the bias correction of step ``k`` (0-based) divides by ``1 - beta ** (k + 1)``,
  fastai's, so the first smoothed value is the first loss (Lightning uses
  the step count after the update, one power more);
* a loss that is not finite also ends the curve (a NaN never compares
  greater, so Lightning would run on);
* the suggestion takes the gradient against log(lr), as Lightning 1.x did
  (``np.gradient`` over the points of an exponential sweep) and as the log-x
  plot shows it; Lightning 2.x takes it against lr itself
  (``torch.gradient(losses, spacing=[lrs])``), which divides it by lr and so
  leans towards the small learning rates;
* the momentum is constant at the recipe's ``max_momentum`` (0.95), the
  momentum its one-cycle schedule starts with. (A Lightning module that builds
  OneCycleLR gets the same: its constructor sets that momentum on the
  optimizer, and the finder then swaps the scheduler for its own.) No weight
  averaging: it does not change the iterates.

`find_lr` runs it all on a dataset; `main` is the CLI, which prints the
suggestion with its rule and writes ``lr_find.png`` and ``lr_find.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from adder import augment as augment_lib
from adder import data as data_lib
from adder import devices
from adder import optim
from adder import config as config_lib
from adder import distributed
from adder import step as step_lib
from adder import train as train_lib
from adder.config import Config

# Defaults of the range test. Six decades around the recipe's peak (0.2): below
# 1e-5 a fresh model hardly moves, and at 10, 50x that peak, the loss is back at
# chance (BatchNorm keeps it from exploding, so it need not pass the divergence
# threshold). 300 steps give 50 points per decade, enough that the smoothing's
# lag (about 1 / (1 - beta) = 50 steps) spans one decade rather than
# Lightning's four (100 steps over 1e-8..1); 300 steps are 0.64 of an epoch.
MIN_LR = 1e-5
MAX_LR = 10.0
STEPS = 300
BETA = 0.98  # smoothing of the loss, Lightning's and fastai's
DIVERGENCE_FACTOR = 4.0  # Lightning's early_stop_threshold
SKIP_BEGIN = 10  # points left out of the suggestion at the start (Lightning's)
SKIP_END = 1  # and at the end: the point that diverged
MIN_STEPS = SKIP_BEGIN + SKIP_END + 2  # two points left to take a gradient on

RULE = ("steepest descent of the smoothed loss against log(lr) (argmin of its "
        f"np.gradient), the first {SKIP_BEGIN} points and the last {SKIP_END} of the "
        "curve up to divergence left out: Lightning's suggestion() as in 1.x")


def exponential_schedule(min_lr: float, max_lr: float, steps: int) -> optax.Schedule:
  """Step ``k`` (0-based update count) -> ``min_lr * (max_lr / min_lr) ** (k / (steps - 1))``.

  float32; ``min_lr`` at step 0 and ``max_lr`` at step ``steps - 1``.
  """
  if not 0.0 < min_lr < max_lr < math.inf:
    raise ValueError(f"need 0 < min_lr < max_lr < inf, got {min_lr} and {max_lr}")
  if steps < 2:
    raise ValueError(f"steps must be at least 2, got {steps}")
  log_min, log_ratio = math.log(min_lr), math.log(max_lr / min_lr)

  def schedule(step):
    frac = jnp.asarray(step, jnp.float32) / (steps - 1)
    return jnp.exp(log_min + frac * log_ratio).astype(jnp.float32)

  return schedule


def smooth(losses: np.ndarray, beta: float = BETA) -> np.ndarray:
  """Exponential moving average of `losses` with bias correction, float64 (K,).

  ``avg_k = beta * avg_{k-1} + (1 - beta) * loss_k`` from ``avg_{-1} = 0``,
  reported as ``avg_k / (1 - beta ** (k + 1))``; a non-finite loss makes
  every later value non-finite.
  """
  out = np.empty(len(losses), np.float64)
  avg = 0.0
  for k, loss in enumerate(np.asarray(losses, np.float64)):
    avg = beta * avg + (1.0 - beta) * loss
    out[k] = avg / (1.0 - beta ** (k + 1))
  return out


def divergence_index(smoothed: np.ndarray, factor: float = DIVERGENCE_FACTOR) -> Optional[int]:
  """Index of the first point of the curve that diverged, or None; the curve ends there.

  A point diverges when it is not finite or, from the second on, exceeds
  ``factor`` times the lowest smoothed loss before it. The curve keeps it
  (``smoothed[:index + 1]``), as Lightning keeps the step it stops after.
  """
  best = math.inf
  for k, value in enumerate(np.asarray(smoothed, np.float64)):
    if not np.isfinite(value) or (k > 0 and value > factor * best):
      return k
    best = min(best, value)
  return None


def suggest(
    lrs: np.ndarray, smoothed: np.ndarray, skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END
) -> Optional[int]:
  """Index of the steepest descent of `smoothed` against log(`lrs`); None if too short.

  Of the points ``skip_begin .. len - skip_end - 1`` with a finite loss, the
  one where ``np.gradient(smoothed, log(lrs))`` is lowest. None when fewer
  than two such points remain.

  Args:
    lrs: float (K,), increasing and positive. smoothed: float (K,).
  """
  lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
  kept = np.arange(skip_begin, len(smoothed) - skip_end)
  kept = kept[np.isfinite(smoothed[kept])]
  if len(kept) < 2:
    return None
  slope = np.gradient(smoothed[kept], np.log(lrs[kept]))
  return int(kept[np.argmin(slope)])


def create_finder_optimizer(config: Config, lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """The recipe's SGD on `lr_fn`, its momentum held at the start of the one-cycle's."""
  return optim.create_sgd(config, lr_fn, config.max_momentum)


def training_plan(
    data_key: jax.Array, num_images: int, batch_size: int, steps: int, augment: bool
) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
  """The first `steps` batches of training: epochs 1, 2, ... of `adder.data.epoch_plan`.

  Returns:
    ``(indices, numbers, augment_keys)``: int32 (steps, batch_size) each, and
    with `augment` each step's key (`adder.augment.step_keys`), else None.
  """
  per_epoch = num_images // batch_size
  epochs = range(1, -(-steps // per_epoch) + 1)
  plans = [data_lib.epoch_plan(data_key, e, num_images, batch_size) for e in epochs]
  indices = jnp.concatenate([p[0] for p in plans])[:steps]
  numbers = jnp.concatenate([p[1] for p in plans])[:steps]
  keys = None
  if augment:
    keys = jnp.concatenate([augment_lib.step_keys(data_key, e, per_epoch) for e in epochs])
    keys = keys[:steps]
  return indices, numbers, keys


def range_test_steps(
    state: step_lib.TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    data_key: jax.Array,
    *,
    batch_size: int,
    steps: int,
    augment: Optional[step_lib.Augment] = None,
    batch_sharding: Optional[NamedSharding] = None,
) -> tuple[step_lib.TrainState, dict]:
  """`training_plan`, then `adder.step.train_steps` over it: per-step metrics (steps,).

  Jit it with everything after ``data_key`` static.
  """
  indices, numbers, keys = training_plan(data_key, images_u8.shape[0], batch_size, steps,
                                         augment is not None)
  return step_lib.train_steps(state, images_u8, labels, indices, numbers, keys,
                               batch_sharding=batch_sharding, augment=augment)


def run_range_test(
    config: Config, dataset: dict[str, np.ndarray], lr_fn: optax.Schedule, steps: int
) -> np.ndarray:
  """Train a fresh model of `config` for `steps` updates at the learning rates of `lr_fn`.

  Placed by `adder.train.setup`, as training is: the images on every device,
  each batch split along the mesh's ``data`` axis; the same initial weights.

  Returns:
    float32 (steps,), the training loss of each step (before its update).

  Raises:
    ValueError: the batch does not divide over the devices, or exceeds the images.
  """
  s, state = train_lib.setup(config, dataset)
  tx = create_finder_optimizer(config, lr_fn)
  state = state.replace(tx=tx, opt_state=tx.init(state.params))
  run = jax.jit(functools.partial(
      range_test_steps, batch_size=config.batch_size, steps=steps,
      augment=step_lib.create_augment(config), batch_sharding=s.batch_sharding),
      donate_argnums=0)
  _, metrics = run(state, s.train_x, s.train_y, s.data_key)
  return np.asarray(distributed.to_host(metrics["loss"]), np.float32)


class RangeTest(NamedTuple):
  """The curve of a range test up to divergence, and the suggestion read on it."""

  lrs: np.ndarray  # float32 (K,), each kept step's learning rate
  losses: np.ndarray  # float32 (K,), each kept step's training loss
  smoothed: np.ndarray  # float64 (K,), `smooth` of every step's loss, cut at K
  steps: int  # steps run
  diverged_at: Optional[int]  # the last index, K - 1, if that point diverged; else None
  suggestion: Optional[int]  # index into the curve (see `suggest`), or None

  @property
  def suggested_lr(self) -> Optional[float]:
    return None if self.suggestion is None else float(self.lrs[self.suggestion])


def find_lr(
    config: Config,
    dataset: dict[str, np.ndarray],
    *,
    min_lr: float = MIN_LR,
    max_lr: float = MAX_LR,
    steps: int = STEPS,
) -> RangeTest:
  """The range test of `config` on `dataset` (as `adder.data.load_mnist` gives it)."""
  lr_fn = exponential_schedule(min_lr, max_lr, steps)
  losses = run_range_test(config, dataset, lr_fn, steps)
  lrs = np.asarray(lr_fn(np.arange(steps)), np.float32)
  smoothed = smooth(losses)
  diverged_at = divergence_index(smoothed)
  kept = steps if diverged_at is None else diverged_at + 1
  return RangeTest(lrs[:kept], losses[:kept], smoothed[:kept], steps, diverged_at,
                   suggest(lrs[:kept], smoothed[:kept]))


def summary(result: RangeTest, config: Config, min_lr: float, max_lr: float) -> dict[str, Any]:
  """What ``lr_find.json`` holds: the settings, the suggestion and its rule, the curve."""
  return {
      "suggestion": result.suggested_lr,
      "suggestion_step": result.suggestion,
      "rule": RULE,
      "min_lr": min_lr, "max_lr": max_lr, "steps": result.steps,
      "diverged_at_step": result.diverged_at,
      "beta": BETA, "divergence_factor": DIVERGENCE_FACTOR,
      "skip_begin": SKIP_BEGIN, "skip_end": SKIP_END,
      "momentum": config.max_momentum, "recipe_lr": config.lr,
      "config": config.to_dict(),
      "curve": {"lr": result.lrs.tolist(), "loss": result.losses.tolist(),
                "smoothed": result.smoothed.tolist()},
  }


def report(result: RangeTest, config: Config) -> list[str]:
  """The lines printed after a range test: where it diverged, the suggestion and its rule."""
  lines = []
  at = result.diverged_at
  if at is None:
    lines.append(f"no divergence up to lr {result.lrs[-1]:.3g}")
  elif not np.isfinite(result.smoothed[at]):
    lines.append(f"diverged at step {at} (lr {result.lrs[at]:.3g}): the loss is not finite")
  else:
    lines.append(f"diverged at step {at} (lr {result.lrs[at]:.3g}): smoothed loss "
                 f"{result.smoothed[at]:.4g}, more than {DIVERGENCE_FACTOR:g}x the lowest "
                 f"before it, {result.smoothed[:at].min():.4g}")
  if result.suggestion is None:
    lines.append(f"no suggestion: the curve up to divergence has {len(result.lrs)} points, "
                 f"too few; lower --min-lr or raise --steps")
  else:
    lines.append(f"suggested peak lr: {result.suggested_lr:.3g} (step {result.suggestion}); "
                 f"the recipe's is {config.lr:g}")
    lines.append(f"rule: {RULE}")
  return lines


def create_parser() -> argparse.ArgumentParser:
  """The range test's flags, with `Config`'s batch size, seed and data flags."""
  p = argparse.ArgumentParser(
      prog="python -m adder.lr_find",
      description="Learning-rate range test of the recipe: from a fresh model, SGD with "
                  "momentum and weight decay while the learning rate grows exponentially; "
                  "prints the suggested peak learning rate and writes lr_find.png and "
                  "lr_find.json.")
  p.add_argument("--out", default="runs/lr_find",
                 help="output folder for lr_find.png and lr_find.json (default: %(default)s)")
  p.add_argument("--min-lr", type=float, default=MIN_LR,
                 help="learning rate of the first step (default: %(default)s)")
  p.add_argument("--max-lr", type=float, default=MAX_LR,
                 help="learning rate of the last step (default: %(default)s)")
  p.add_argument("--steps", type=int, default=STEPS,
                 help="updates, the learning rate growing by the same factor each "
                      "(default: %(default)s)")
  config_lib.add_flags(p, ("batch_size", "seed", *config_lib.DATA_FLAGS))
  return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
  """Flags -> (the default `Config` with the data, seed and batch flags, the parsed flags).

  The config is not yet checked: `main` calls `Config.validate`.
  """
  p = create_parser()
  a = p.parse_args(argv)
  if not 0 < a.min_lr < a.max_lr < math.inf:
    p.error("--min-lr and --max-lr must satisfy 0 < min < max, both finite")
  if a.steps < MIN_STEPS:
    p.error(f"--steps must be at least {MIN_STEPS}")
  return config_lib.from_flags(a), a


def main(argv: Optional[list[str]] = None) -> int:
  """The CLI. Exit status 0, or 2 with one ``error:`` line."""
  from adder import plots  # pylint: disable=g-import-not-at-top
  config, args = parse_args(argv)
  try:
    cpu_choice = devices.configure_cpu_devices(config.validate().batch_size)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise ValueError(f"--out {args.out} is a file, not a folder")
    os.makedirs(args.out, exist_ok=True)
    train_lib.check_batch_size(config.batch_size, jax.device_count())
    if jax.default_backend() == "cpu":
      print(cpu_choice)
    dataset = data_lib.load_mnist(config.mnist_dir, config.data_dir)
    print(f"range test: {args.steps} steps of {config.batch_size}, lr {args.min_lr:g} to "
          f"{args.max_lr:g} (exponential), SGD momentum {config.max_momentum} weight decay "
          f"{config.weight_decay}, seed {config.seed}", flush=True)
    result = find_lr(config, dataset, min_lr=args.min_lr, max_lr=args.max_lr,
                     steps=args.steps)
  except (data_lib.DataError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(report(result, config)))
  png = plots.plot_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion,
                           os.path.join(args.out, "lr_find.png"), reference_lr=config.lr)
  path = os.path.join(args.out, "lr_find.json")
  with open(path, "w") as f:
    json.dump(summary(result, config, args.min_lr, args.max_lr), f, indent=2)
  print(f"wrote {png} and {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
