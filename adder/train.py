"""Training: a TrainState pytree through a pure, jitted step; the CLI.

``python -m adder.train [flags]`` parses flags into an `adder.config.Config` and
calls `train_and_evaluate`. Everything else here is importable:

* `train_step(state, batch) -> (state, metrics)`: one SGD update on a batch.
* `train_steps`: a ``lax.scan`` of `train_step` over many batches gathered
  on the device from the uint8 images already there (one jit call per chunk of
  steps, buffers donated, no host work per step).
* `predict` / `evaluate`: large jitted batches over fixed (image, integer) pairs.
* `recompute_batch_stats`: BatchNorm statistics for averaged weights, as
  ``torch.optim.swa_utils.update_bn`` computes them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adder import data as data_lib
from adder import metrics as metrics_lib
from adder import model as model_lib
from adder import optim
from adder.config import Config, add_recipe_flags, config_from_flags



def steps_per_call(backend: str) -> int:
  """Training steps per jit call: the scan length of `train_steps`.

  On the CPU, one: XLA:CPU runs a loop body (even a scan of length one) several
  times slower than the same computation jitted on its own (measured 4.5-7x
  for this model), so the jit boundary there is one `train_batch`. On accelerators, 100 steps per call keep the host out
  of the way while the progress bar still moves.
  """
  return 1 if backend == "cpu" else 100


class TrainState(train_state.TrainState):
  """params, opt_state and step (from Flax) plus the BatchNorm running statistics."""

  batch_stats: Any


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
  )
  return state, lr_fn


def cross_entropy_loss(
    digit_logits: jax.Array, sum_logits: jax.Array, digits: jax.Array, sums: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean cross-entropy of the digit head plus mean cross-entropy of the sum head.

  Args: logits float32 (B, 10) and (B, 19); integer labels (B,).
  Returns: ``(total, (digit_loss, sum_loss))``, float32 scalars.
  """
  digit_loss = optax.softmax_cross_entropy_with_integer_labels(digit_logits, digits).mean()
  sum_loss = optax.softmax_cross_entropy_with_integer_labels(sum_logits, sums).mean()
  return digit_loss + sum_loss, (digit_loss, sum_loss)


def make_batch(
    images_u8: jax.Array, labels: jax.Array, indices: jax.Array, numbers: jax.Array
) -> dict[str, jax.Array]:
  """Gather a training batch on the device.

  Args:
    images_u8: uint8 (N, 28, 28), the whole image set. labels: int32 (N,).
    indices: int32 (B,) into the set. numbers: int32 (B,) in 0..9.

  Returns:
    ``{"image": float32 (B, 28, 28, 1) normalised, "number": int32 (B,),
    "digit": int32 (B,), "sum": int32 (B,) in 0..18}``.
  """
  digits = labels[indices]
  return {
      "image": model_lib.normalize_images(images_u8[indices]),
      "number": numbers,
      "digit": digits,
      "sum": digits + numbers,
  }


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
  """One update on one batch (see `make_batch`). Pure: new state, scalar metrics."""

  def loss_fn(params):
    (digit_logits, sum_logits), updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        batch["image"], batch["number"], train=True, mutable=["batch_stats"])
    loss, (digit_loss, sum_loss) = cross_entropy_loss(
        digit_logits, sum_logits, batch["digit"], batch["sum"])
    return loss, (updates["batch_stats"], digit_loss, sum_loss)

  (loss, (batch_stats, digit_loss, sum_loss)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": loss, "digit_loss": digit_loss, "sum_loss": sum_loss}


def train_batch(
    state: TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    numbers: jax.Array,
    *,
    batch_sharding: Optional[NamedSharding] = None,
) -> tuple[TrainState, dict]:
  """Gather one batch on the device (see `make_batch`) and take one `train_step`.

  Args:
    indices, numbers: int32 (B,), e.g. a row of `adder.data.epoch_plan`.
    batch_sharding: where the batch lives (split along the mesh's ``data``
      axis); None leaves placement to the compiler.
  """
  batch = make_batch(images_u8, labels, indices, numbers)
  if batch_sharding is not None:
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
  return train_step(state, batch)


def train_steps(
    state: TrainState,
    images_u8: jax.Array,
    labels: jax.Array,
    indices: jax.Array,
    numbers: jax.Array,
    *,
    batch_sharding: Optional[NamedSharding] = None,
) -> tuple[TrainState, dict]:
  """`train_batch` scanned over the rows of ``indices`` and ``numbers`` (steps, B).

  Returns the new state and per-step metrics, each float32 (steps,). Used on
  accelerators; see `steps_per_call` for why the CPU jits `train_batch` alone.
  """

  def body(state, xs):
    return train_batch(state, images_u8, labels, *xs, batch_sharding=batch_sharding)

  return jax.lax.scan(body, state, (indices, numbers))


def predict(
    apply_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    image_index: jax.Array,
    numbers: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Predicted (digit, sum), int32 (B,), for the cases (image_index[b], numbers[b]).

  Eval mode (running BatchNorm statistics). Jit it with ``apply_fn`` static;
  `evaluate` feeds it fixed-size chunks.
  """
  digit_logits, sum_logits = apply_fn(
      variables, model_lib.normalize_images(images_u8[image_index]), numbers, train=False)
  return (jnp.argmax(digit_logits, -1).astype(jnp.int32),
          jnp.argmax(sum_logits, -1).astype(jnp.int32))


def batch_statistics(
    model: model_lib.AdderNet, params: Any, images_u8: jax.Array, indices: jax.Array
) -> Any:
  """Per-layer BatchNorm statistics (mean, unbiased var) of one batch, train mode.

  Args: indices int32 (B,) into ``images_u8`` uint8 (N, 28, 28).
  Returns: a ``batch_stats`` pytree for `model`. Jit with `model` static.
  """
  probe = model.clone(bn_momentum=0.0)  # running stats := this batch's
  template = jax.eval_shape(
      functools.partial(model_lib.init_variables, model), jax.random.PRNGKey(0))
  stats = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), template["batch_stats"])
  _, updates = probe.apply(
      {"params": params, "batch_stats": stats}, model_lib.normalize_images(images_u8[indices]),
      jnp.zeros(indices.shape, jnp.int32), train=True, mutable=["batch_stats"])
  return updates["batch_stats"]


def recompute_batch_stats(
    model: model_lib.AdderNet, params: Any, images_u8: jax.Array, indices: jax.Array
) -> Any:
  """BatchNorm running statistics for `params`, as ``update_bn`` computes them.

  Each batch's statistics come from a forward pass in training mode (mean and
  unbiased variance); the result is their plain average over the batches
  (PyTorch's cumulative average, ``momentum=None``). The integer input does not
  reach any BatchNorm layer, so zeros stand in for it.

  Args:
    indices: int32 (steps, B), the batches of images to use.

  Returns:
    A ``batch_stats`` pytree for `model`.
  """
  stats_fn = jax.jit(batch_statistics, static_argnums=0)
  avg = None
  for k, batch_idx in enumerate(indices):
    stats = stats_fn(model, params, images_u8, batch_idx)
    avg = stats if avg is None else jax.tree_util.tree_map(
        lambda a, s: a + (s - a) / (k + 1), avg, stats)
  return avg


def evaluate(
    predict_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    labels: np.ndarray,
    image_index: np.ndarray,
    numbers: np.ndarray,
    batch_size: int,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
  """Metrics (see `adder.metrics`) and host predictions over fixed cases.

  The cases go through ``predict_fn`` (a jitted `predict`) in chunks of
  ``batch_size``, the last one padded so that it compiles once.
  """
  m = len(image_index)
  pad = -m % batch_size
  idx = np.pad(image_index, (0, pad)).reshape(-1, batch_size)
  nums = np.pad(numbers, (0, pad)).reshape(-1, batch_size)
  outs = [predict_fn(variables, images_u8, i, n) for i, n in zip(idx, nums)]
  digit_pred, sum_pred = (np.concatenate(x)[:m] for x in zip(*to_host(outs)))
  scores = metrics_lib.compute_metrics(digit_pred, sum_pred, labels[image_index], numbers)
  return scores, (digit_pred, sum_pred)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays, identical on every process, as global arrays laid out by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
  """Fully replicated (or local) arrays as numpy, on any process."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def is_main_process() -> bool:
  """Only process 0 prints, and writes logs, plots and checkpoints."""
  return jax.process_index() == 0


def _log(*args) -> None:
  if is_main_process():
    print(*args, flush=True)


def create_mesh() -> Mesh:
  """A 1-D mesh with axis ``data`` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def describe_devices() -> str:
  return (f"JAX {jax.__version__} backend={jax.default_backend()} "
          f"devices={[str(d) for d in jax.devices()]}")


def _log_line(epoch: int, epochs: int, row: dict) -> str:
  return (f"epoch {epoch:2d}/{epochs}  loss {row['train_loss']:.4f}  "
          f"test digit {row['test_digit_acc']:.4f} sum {row['test_sum_acc']:.4f} "
          f"joint {row['test_joint_acc']:.4f}  lr {row['lr']:.5f}  {row['seconds']:.1f}s")


def train_and_evaluate(
    config: Config,
    workdir: str,
    *,
    dataset: Optional[dict[str, np.ndarray]] = None,
    write_artifacts: bool = True,
) -> dict[str, Any]:
  """Train `config` from scratch, evaluate, and write the workdir.

  Args:
    config: the run.
    workdir: receives ``metrics.jsonl``, ``results.json``, ``checkpoint/`` and
      PNG plots.
    dataset: arrays as returned by `adder.data.load_mnist`; None loads MNIST.
    write_artifacts: False skips checkpoint and plots (quick experiments).

  Returns:
    The results dictionary also written to ``results.json``.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  _log(describe_devices())
  if config.require_gpu and jax.default_backend() != "gpu":
    raise SystemExit(
        f"error: --require-gpu: JAX sees no GPU (backend {jax.default_backend()}); "
        "install jax[cuda12] or jax[cuda13] (see README)")
  main_process = is_main_process()
  if main_process:
    os.makedirs(workdir, exist_ok=True)

  mesh = create_mesh()
  n_dev = mesh.size
  if config.batch_size % n_dev:
    raise ValueError(
        f"batch size {config.batch_size} does not divide over {n_dev} devices; "
        f"use a multiple of {n_dev}")
  if dataset is None:
    dataset = data_lib.load_mnist(config.mnist_dir, config.data_dir)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  # Every process holds the whole (small) dataset on each device; each batch is
  # gathered inside the step and split along the `data` axis, so a device
  # only computes on its shard and BatchNorm sees the global batch.
  train_x, train_y, test_x = replicate(
      (dataset["train_images"], dataset["train_labels"], dataset["test_images"]), replicated)
  test_y = dataset["test_labels"]
  num_train = train_x.shape[0]
  steps_per_epoch = num_train // config.batch_size

  key = jax.random.PRNGKey(config.seed)
  init_key, data_key = jax.random.split(key)
  state, lr_fn = create_train_state(config, init_key, steps_per_epoch)
  state = replicate(state, replicated)
  model = model_lib.create_model(config)
  n_params = model_lib.count_params(state.params)
  _log(f"model: {n_params:,} parameters; {steps_per_epoch} steps/epoch of "
       f"{config.batch_size}")

  chunk = steps_per_call(jax.default_backend())
  plan_fn = jax.jit(data_lib.epoch_plan, static_argnums=(2, 3))
  step_fn = jax.jit(train_batch if chunk == 1 else train_steps, donate_argnums=0,
                    static_argnames="batch_sharding")
  predict_fn = jax.jit(functools.partial(predict, model.apply))
  evaluate_ = functools.partial(evaluate, predict_fn, batch_size=config.eval_batch_size)

  test_index = np.arange(test_y.shape[0], dtype=np.int32)
  test_nums = data_lib.test_numbers(test_y.shape[0], config.eval_seed)
  history = []
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if main_process:
    open(metrics_path, "w").close()
  train_seconds = 0.0
  for epoch in range(1, config.epochs + 1):
    t0 = time.perf_counter()
    indices, numbers = plan_fn(data_key, epoch, num_train, config.batch_size)
    losses = []
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", unit="step",
              leave=False, disable=None if main_process else True, miniters=chunk) as bar:
      for start in range(0, steps_per_epoch, chunk):
        stop = min(start + chunk, steps_per_epoch)
        rows = start if chunk == 1 else slice(start, stop)  # one batch, or (steps, B)
        state, m = step_fn(state, train_x, train_y, indices[rows], numbers[rows],
                           batch_sharding=batch_sharding)
        losses.append(m["loss"])
        bar.update(stop - start)
    losses = np.concatenate([np.ravel(x) for x in to_host(losses)])
    seconds = time.perf_counter() - t0
    train_seconds += seconds
    if not np.all(np.isfinite(losses)):
      raise FloatingPointError(
          f"loss became {losses[~np.isfinite(losses)][0]} in epoch {epoch}; "
          "lower --lr")
    scores, _ = evaluate_({"params": state.params, "batch_stats": state.batch_stats},
                          test_x, test_y, test_index, test_nums)
    row = {"epoch": epoch, "train_loss": float(losses.mean()),
           **{f"test_{k}": v for k, v in scores.items()},
           "lr": float(lr_fn(int(state.step) - 1)), "seconds": seconds}
    history.append(row)
    if main_process:
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    _log(_log_line(epoch, config.epochs, row))

  # Final evaluation: fixed test pairs and the exhaustive set, for each weight set.
  ex_index, ex_nums = data_lib.exhaustive_pairs(test_y.shape[0])
  weight_sets = {"final": {"params": state.params, "batch_stats": state.batch_stats}}
  swa = optim.swa_state(state.opt_state)
  if swa is not None and int(swa.n_averaged) > 0:
    bn_indices = jnp.arange(steps_per_epoch * config.batch_size, dtype=jnp.int32).reshape(
        steps_per_epoch, config.batch_size)
    weight_sets["swa"] = {"params": swa.mean, "batch_stats": recompute_batch_stats(
        model, swa.mean, train_x, bn_indices)}

  results: dict[str, Any] = {}
  test_preds = {}
  for name, variables in weight_sets.items():
    test_scores, (digit_pred, sum_pred) = evaluate_(
        variables, test_x, test_y, test_index, test_nums)
    ex_scores, _ = evaluate_(variables, test_x, test_y, ex_index, ex_nums)
    results[name] = {"test": test_scores, "exhaustive": ex_scores}
    _log(f"{name:5s}  test joint {test_scores['joint_acc']:.4f}  exhaustive: digit "
         f"{ex_scores['digit_acc']:.4f} sum {ex_scores['sum_acc']:.4f} joint "
         f"{ex_scores['joint_acc']:.4f} consistency {ex_scores['consistency']:.4f}")
    test_preds[name] = (digit_pred, sum_pred)

  results.update({
      "params": n_params,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "local_devices": jax.local_device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "train_seconds": train_seconds,
      "config": config.to_dict(),
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "python": platform.python_version()},
  })
  if not main_process:
    return results
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)

  if write_artifacts:
    from adder import checkpoint, plots  # pylint: disable=g-import-not-at-top
    checkpoint.save(os.path.join(workdir, "checkpoint"),
                    to_host(weight_sets), config)
    plots.write_all(workdir, history, dataset["test_images"], test_y, test_nums,
                    *test_preds[checkpoint.preferred_weights(weight_sets)])
  return results


_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def initialize_distributed(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> None:
  """Join a multi-process run: with the flags, or when a cluster launcher is seen.

  With no flags, ``jax.distributed.initialize()`` is called only when a
  launcher says there are several processes (SLURM, Open MPI, MPICH/PMI) or
  ``JAX_COORDINATOR_ADDRESS`` is set; JAX then reads the rest from the
  environment. A single process needs none of this.
  """
  if coordinator or num_processes is not None or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes, process_id=process_id)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS") or any(
      int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_ENV):
    jax.distributed.initialize()


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
  """Flags -> (Config, the parsed flags). Unset flags keep `Config`'s defaults."""
  p = argparse.ArgumentParser(
      prog="python -m adder.train",
      description="Train the MNIST adder (image + integer 0-9 -> digit, sum) and "
                  "evaluate it on fixed test pairs and the exhaustive set.")
  p.add_argument("--workdir", default="runs/default",
                 help="output folder: metrics.jsonl, results.json, checkpoint/, plots "
                      "(default: %(default)s)")
  add_recipe_flags(p)
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
  config = config_from_flags(p, a).replace(require_gpu=a.require_gpu)
  return config, a


def main(argv: Optional[list[str]] = None) -> int:
  config, args = parse_args(argv)
  workdir = args.workdir
  try:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    train_and_evaluate(config, workdir)
  except (data_lib.DataError, FloatingPointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted; per-epoch metrics so far are in {workdir}/metrics.jsonl",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
