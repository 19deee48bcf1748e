"""The training loop: `train_and_evaluate(config, workdir)` and its phases.

``python -m adder.train [flags]`` runs it from the command line (`adder.cli`).
`train_and_evaluate` reads as its phases, each in the module named after its
job:

1. `adder.workdir.saved_run`: what the workdir holds, refused if it is another run;
2. `setup`: the data on the devices, the jitted epoch and evaluation, the state;
3. `adder.workdir.resume`: the saved epoch, if any;
4. `train_epochs`: `run_epoch` (one jitted ``lax.scan`` of `adder.step`, then
   the test pairs) per epoch, each row logged, written and saved
   (`adder.workdir.save_state`) as ``Config.save_every_s`` says;
5. `adder.evaluation.final_weight_sets` (BatchNorm statistics recomputed by
   `adder.batch_norm`) and `adder.evaluation.final_evaluation`;
6. ``results.json``, the checkpoint and the plots.

A run of several processes runs all of this in every process, in step
(`adder.distributed`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from adder import batch_norm
from adder import checkpoint
from adder import conv_cpu
from adder import data as data_lib
from adder import devices
from adder import distributed
from adder import evaluation
from adder import metrics as metrics_lib
from adder import model as model_lib
from adder import step as step_lib
from adder import stopping
from adder import tensorboard
from adder import workdir as workdir_lib
from adder.config import Config

log = distributed.log


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
  batch_size: int
  steps_per_epoch: int
  epoch_fn: Callable  # `adder.step.epoch_function`: jitted `train_epoch`
  evaluate: evaluation.Evaluate  # `adder.evaluation.evaluate` over test_x / test_y

  def plain_batch_stats(self, params: Any) -> Any:
    """`adder.batch_norm.plain_batch_stats` of `params` over the training images."""
    return batch_norm.plain_batch_stats(self.model, params, self.train_x, self.batch_size,
                                        self.batch_sharding)


def check_batch_size(batch_size: int, n_dev: int) -> None:
  """The global batch must split evenly over the ``data`` axis."""
  if batch_size % n_dev:
    raise ValueError(f"batch size {batch_size} does not divide over {n_dev} devices; "
                     f"use a multiple of {n_dev}")


def check_batch_fits(batch_size: int, num_images: int) -> None:
  """An epoch needs at least one full batch of the training images."""
  if batch_size > num_images:
    raise ValueError(f"batch size {batch_size} exceeds the {num_images} training images")


def setup(config: Config, dataset: dict[str, np.ndarray]) -> tuple[Setup, step_lib.TrainState]:
  """Mesh, data on the devices, the jitted functions, and the initial state."""
  mesh = devices.create_mesh()
  check_batch_size(config.batch_size, mesh.size)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  # Every process holds the whole (small) dataset on each device; each batch is
  # gathered inside the step and split along the `data` axis, so a device
  # only computes on its shard and BatchNorm sees the global batch.
  train_x, train_y, test_x = distributed.replicate(
      (dataset["train_images"], dataset["train_labels"], dataset["test_images"]), replicated)
  check_batch_fits(config.batch_size, train_x.shape[0])
  steps_per_epoch = train_x.shape[0] // config.batch_size

  init_key, data_key = jax.random.split(jax.random.PRNGKey(config.seed))
  state, lr_fn = step_lib.create_train_state(config, init_key, steps_per_epoch)
  model = model_lib.create_model(config)
  # Evaluation chunks split along `data` too; the outputs come back replicated.
  eval_fn = jax.jit(functools.partial(evaluation.eval_step, model.apply,
                                      consistency_weight=config.consistency_weight),
                    out_shardings=replicated)
  eval_batch = -(-config.eval_batch_size // mesh.size) * mesh.size
  evaluate = functools.partial(evaluation.evaluate, eval_fn, images_u8=test_x,
                               labels=dataset["test_labels"], batch_size=eval_batch,
                               sharding=batch_sharding)
  s = Setup(mesh, batch_sharding, train_x, train_y, test_x, dataset["test_labels"], model,
            lr_fn, data_key, config.batch_size, steps_per_epoch,
            step_lib.epoch_function(config, batch_sharding), evaluate)
  return s, distributed.replicate(state, replicated)


def test_pairs(num_test: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
  """The seeded pairs: each test image once, with its integer from ``config.eval_seed``."""
  return (np.arange(num_test, dtype=np.int32), data_lib.test_numbers(num_test, config.eval_seed))


def run_epoch(
    s: Setup, state: step_lib.TrainState, epoch: int, pairs: tuple[np.ndarray, np.ndarray]
) -> tuple[step_lib.TrainState, dict[str, Any], np.ndarray]:
  """Train one epoch (one jit call), then score the test pairs: the metrics row.

  ``seconds`` is the training time alone, up to the host holding the epoch's
  losses; the evaluation after it is not counted.

  Returns:
    The new state, the metrics row, and each step's training loss, float32
    (steps_per_epoch,), on the host.
  """
  t0 = time.perf_counter()
  state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, epoch)
  losses = distributed.to_host(m["loss"])
  seconds = time.perf_counter() - t0
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(
        f"loss became {losses[~np.isfinite(losses)][0]} in epoch {epoch}; lower --lr")
  scores, _ = s.evaluate({"params": state.params, "batch_stats": state.batch_stats},
                         image_index=pairs[0], numbers=pairs[1])
  row = {"epoch": epoch, "train_loss": float(losses.mean()),
         **{f"test_{k}": v for k, v in scores.items()},
         "lr": float(s.lr_fn(int(state.step) - 1)), "seconds": seconds}
  return state, row, losses


def _stop_signal(stop: Optional[stopping.StopRequest], epoch: int) -> Optional[int]:
  """The signal that stops the run after `epoch`, the same on every process; None: go on.

  Collective: every process calls it after every epoch. SIGTERM in a run of
  several processes comes through JAX's preemption notice; a signal to
  process 0 stops every process.
  """
  if distributed.preempted(epoch):
    return signal.SIGTERM
  asked = stop.signum if stop is not None else None
  if distributed.agree(asked is not None):
    return asked or signal.SIGINT
  return None


def _saved_message(states: ocp.CheckpointManager) -> str:
  """Waits for the saves under way; says which epoch is saved and how to resume."""
  saved = checkpoint.wait_for_saves(states)
  if not saved:
    return "no epoch was saved"
  return (f"epoch {saved} is saved in {states.directory}: run the same command again "
          "to resume")


def train_epochs(
    config: Config,
    s: Setup,
    state: step_lib.TrainState,
    history: list[dict],
    states: ocp.CheckpointManager,
    workdir: str,
    pairs: tuple[np.ndarray, np.ndarray],
    stop: Optional[stopping.StopRequest] = None,
) -> tuple[step_lib.TrainState, list[dict]]:
  """The epochs after those in `history` up to ``config.epochs``, logged and saved.

  ``metrics.jsonl`` is first rewritten from `history` (a resumed run's rows,
  each once); every epoch then appends its row, and saves its state
  (`adder.workdir.save_state`) once ``config.save_every_s`` have passed since
  the last save, after the last epoch, and when `stop` has caught a signal.
  Process 0 also writes each epoch's row, per-step losses and learning rates
  as TensorBoard events (`adder.tensorboard`).

  Raises:
    adder.stopping.Stopped: `stop` caught a signal; the epoch in progress
      was finished and saved.
    KeyboardInterrupt: with no `stop`, Ctrl-C; the saves under way are
      finished first, and the message says which epoch is saved.
  """
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  main = distributed.is_main_process()
  if main:
    with open(metrics_path, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in history)
  events = (tensorboard.event_log(workdir, s.lr_fn, s.steps_per_epoch, len(history))
            if main else None)
  history, epoch, last_save = list(history), len(history) + 1, time.perf_counter()
  try:
    for epoch in range(len(history) + 1, config.epochs + 1):
      state, row, losses = run_epoch(s, state, epoch, pairs)
      history.append(row)
      signum = _stop_signal(stop, epoch)
      due = epoch == config.epochs or time.perf_counter() - last_save >= config.save_every_s
      if distributed.agree(due) or signum:  # process 0's clock decides for every process
        workdir_lib.save_state(states, epoch, state, history, config)
        last_save = time.perf_counter()
      if main:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
        events.write_epoch(row, losses)
      log(metrics_lib.epoch_line(row, config.epochs))
      if signum:
        raise stopping.Stopped(signum, f"after epoch {epoch}/{config.epochs}; "
                                       f"{_saved_message(states)}")
  except KeyboardInterrupt:
    raise KeyboardInterrupt(f"in epoch {epoch}/{config.epochs}; "
                            f"{_saved_message(states)}") from None
  finally:
    if events is not None:
      events.close()
  return state, history


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


def write_results(workdir: str, results: dict[str, Any]) -> None:
  """``<workdir>/results.json`` (process 0)."""
  if distributed.is_main_process():
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)


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
  the same on every process, from process 0 alone). Process 0 draws the plots,
  whose titles name the weights they show.
  """
  checkpoint.save(os.path.join(workdir, "checkpoint"), distributed.to_host(weight_sets), config)
  if distributed.is_main_process():
    from adder import plots  # pylint: disable=g-import-not-at-top
    weights = checkpoint.preferred_weights(weight_sets)
    plots.write_all(workdir, history, dataset["test_images"], dataset["test_labels"],
                    test_numbers, *test_preds[weights], weights=weights)


def check_before_data(config: Config, dataset: Optional[dict[str, np.ndarray]]) -> None:
  """What can be refused before the data loads: a bad config, no GPU, a batch too big."""
  config.validate()
  log(devices.describe())
  if jax.default_backend() == "cpu":
    log(conv_cpu.describe())
  if config.require_gpu and jax.default_backend() != "gpu":
    raise ValueError(f"--require-gpu: JAX sees no GPU (backend {jax.default_backend()}); "
                     "install jax[cuda12] or jax[cuda13] (see README)")
  check_batch_size(config.batch_size, jax.device_count())
  if dataset is None:
    check_batch_fits(config.batch_size, data_lib.SPLIT_SIZES["train"])


def train_and_evaluate(
    config: Config,
    workdir: str,
    *,
    dataset: Optional[dict[str, np.ndarray]] = None,
    write_artifacts: bool = True,
    restart: bool = False,
    stop: Optional[stopping.StopRequest] = None,
) -> dict[str, Any]:
  """Train `config` (resuming the run saved in `workdir`, if any), evaluate, write the workdir.

  Args:
    config: the run; checked first (`Config.validate`).
    workdir: receives ``metrics.jsonl``, ``results.json``, ``checkpoint/``,
      PNG plots, ``tensorboard/`` and ``state/`` (saved epochs, to resume from).
    dataset: arrays as returned by `adder.data.load_mnist`; None loads MNIST.
    write_artifacts: False skips checkpoint and plots (quick experiments).
    restart: delete the saved training state and start from scratch.
    stop: a signal caught here (`adder.stopping.on_signals`) stops the run
      after the epoch in progress, saved.

  Returns:
    The results also written to ``results.json``: scores, run info,
    ``train_seconds`` (the epochs' training time, over every session of a
    resumed run) and ``wall_seconds`` (this session, data in memory to scores).

  Raises:
    ValueError: a bad config, batch size or workdir, or a workdir holding a
      run of another config. adder.checkpoint.CheckpointError: an unreadable
      saved state. adder.stopping.Stopped, KeyboardInterrupt: see `train_epochs`.
  """
  check_before_data(config, dataset)
  workdir_lib.make_workdir(workdir)
  with checkpoint.open_states(workdir) as states:
    saved = workdir_lib.saved_run(states, config, restart=restart)
    if dataset is None:
      dataset = data_lib.load_mnist(config.mnist_dir, config.data_dir)
    t_start = time.perf_counter()
    s, state = setup(config, dataset)
    n_params = model_lib.count_params(state.params)
    log(f"model: {n_params:,} parameters; {s.steps_per_epoch} steps/epoch of "
        f"{config.batch_size}, one jit call per epoch")
    pairs = test_pairs(s.test_y.shape[0], config)
    state, history = workdir_lib.resume(config, state, states, saved, s.steps_per_epoch,
                                        NamedSharding(s.mesh, P()))
    state, history = train_epochs(config, s, state, history, states, workdir, pairs, stop)

  weight_sets = evaluation.final_weight_sets(state, s.plain_batch_stats,
                                             config.recomputes_final_batch_stats)
  results, test_preds = evaluation.final_evaluation(s.evaluate, s.test_y, weight_sets, pairs)
  results.update(run_info(config, n_params), train_seconds=sum(r["seconds"] for r in history),
                 wall_seconds=time.perf_counter() - t_start)
  write_results(workdir, results)
  if write_artifacts:
    write_checkpoint_and_plots(workdir, config, weight_sets, history, dataset, pairs[1],
                               test_preds)
  # The processes leave together, so that none waits at exit for process 0's
  # files (see adder.distributed.DISTRIBUTED_TIMEOUTS).
  distributed.wait_for_every_process("done")
  return results


if __name__ == "__main__":
  from adder import cli  # pylint: disable=g-import-not-at-top
  sys.exit(cli.main())
