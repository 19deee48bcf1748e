"""Benchmark: adder's JAX trainer against the PyTorch reference, side by side.

Command (from the repository root; it writes its section of BENCHMARKS.md):

  python experiments/benchmark.py --seeds 3 --epochs 20 --mnist-dir ../shared/mnist

last run: see BENCHMARKS.md

One run on one machine measures, with the same model, batch size and epochs:

* (a) `adder.train`'s JAX trainer, driven the way `adder.train` drives it
  (one jit call of `train_epoch` per epoch, on the devices
  `adder.devices.configure_cpu_devices` chooses; `train_and_evaluate` for the
  training runs);
* (b) the PyTorch reference (``experiments/torch_reference.py``) with the
  original pipeline: the per-sample `MNISTAdder` Dataset behind a DataLoader;
* (c) the same reference with the whole training set in memory as tensors.

Each of (a), (b), (c) runs in its own subprocess (this script with a hidden
``--_worker`` flag), one after the other, so that its peak RSS is its own and
no framework's threads compete with another's. If both JAX and PyTorch see a
GPU, JAX runs on it and PyTorch on ``cuda`` ("GPU" section); otherwise both run
on the CPU ("CPU" section, JAX forced there with ``JAX_PLATFORMS=cpu``), each
with its best CPU settings: JAX as `adder.devices.configure_cpu_devices` leaves
it (one device, XLA's threads; measured faster than one device per core),
PyTorch with one intra-op thread per core (``torch.set_num_threads``).

``--quick`` (for the tests, under a minute) runs on small fake data shaped like
`adder.data.load_mnist`'s output unless ``--mnist-dir`` is given, with 1 epoch,
1 seed and a few timing steps, and prints the markdown instead of writing
BENCHMARKS.md unless ``--out`` is given.

``--from-json PATH`` runs nothing: it renders the section again from the
figures an earlier run wrote with ``--json`` (``docs/benchmark-cpu.json``,
``docs/gpu-run-h200/bench.json``) and prints it, or writes it into ``--out``.
``--xla-convolutions`` runs (a) on the CPU with XLA's own convolutions instead
of `adder.conv_cpu`'s kernels (`adder.conv_cpu.use_kernels`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from adder.config import Config  # noqa: E402  (imports no framework)

SCRIPT = os.path.abspath(__file__)
DEFAULT_OUT = os.path.join(_REPO_ROOT, "BENCHMARKS.md")
TARGET_JOINT_ACC = 0.99  # "time to 99%": first epoch whose test joint accuracy reaches it
WORKERS = ("jax", "torch_dataloader", "torch_inmemory")
LABELS = {"jax": "(a) JAX adder.train", "torch_dataloader": "(b) PyTorch DataLoader",
          "torch_inmemory": "(c) PyTorch in memory"}
# --quick: sizes of the fake (or subset) data and of the evaluation batches.
QUICK_TRAIN, QUICK_TEST, QUICK_EVAL_BATCH = 512, 200, 1000
FILE_HEADER = (
    "# Benchmarks\n\n"
    "Each section below is written by `experiments/benchmark.py` from one run (its "
    "command is inside); rerun the command to update a section, do not edit by hand.\n")


# --- flags ------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  """Flags, with the defaults of full and ``--quick`` runs resolved."""
  d = Config()
  p = argparse.ArgumentParser(
      prog="python experiments/benchmark.py",
      description="Time and score adder's JAX trainer against the PyTorch reference "
                  "(DataLoader and in-memory pipelines) and write BENCHMARKS.md.")
  p.add_argument("--epochs", type=int, default=None,
                 help=f"epochs of each training run (default: {d.epochs}; --quick: 1)")
  p.add_argument("--seeds", type=int, default=None,
                 help="training runs per pipeline, seeds 0..N-1 (default: 3; --quick: 1)")
  p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
  p.add_argument("--steps", type=int, default=None,
                 help="training steps timed at steady state, after a first call timed "
                      "apart (default: 300; --quick: 5)")
  p.add_argument("--num-workers", type=int, default=0,
                 help="DataLoader worker processes of (b) (default: %(default)s, as the "
                      "reference)")
  p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                 help="auto: GPU if both JAX and PyTorch see one, else CPU (default)")
  p.add_argument("--xla-convolutions", action="store_true",
                 help="(a) on the CPU with XLA's own convolutions instead of "
                      "adder.conv_cpu's kernels (conv_cpu.use_kernels(False))")
  p.add_argument("--mnist-dir", default=None,
                 help="folder with the four official MNIST IDX .gz files (default: "
                      "$ADDER_MNIST_DIR, else TFDS downloads; --quick: fake data)")
  p.add_argument("--data-dir", default=None,
                 help="MNIST prepared by `python -m adder.data` (ArrayRecord); prepared "
                      "there if absent (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--quick", action="store_true",
                 help=f"for tests: fake data ({QUICK_TRAIN} train / {QUICK_TEST} test "
                      "images) unless --mnist-dir, 1 epoch, 1 seed, 5 timing steps; "
                      "prints the markdown unless --out is given")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
  p.add_argument("--from-json", default=None, metavar="PATH",
                 help="run nothing: render the section from the figures of an earlier "
                      "run's --json and print it (written into --out if given)")
  p.add_argument("--out", default=None, metavar="PATH",
                 help="markdown file whose CPU or GPU section this run replaces "
                      "(default: BENCHMARKS.md at the repository root; --quick and "
                      "--from-json: none)")
  _add_worker_flags(p)
  a = p.parse_args(argv)
  if a.epochs is None:
    a.epochs = 1 if a.quick else d.epochs
  if a.seeds is None:
    a.seeds = 1 if a.quick else 3
  if a.steps is None:
    a.steps = 5 if a.quick else 300
  for name in ("epochs", "seeds", "batch_size", "steps"):
    if getattr(a, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be at least 1")
  if a.num_workers < 0:
    p.error("--num-workers must be at least 0")
  if a.out is None and not a.quick and not a.from_json:
    a.out = DEFAULT_OUT
  return a


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
  """Internal flags: one framework's measurements in a subprocess (see `_run_worker`)."""
  p.add_argument("--_worker", dest="worker", choices=WORKERS, help=argparse.SUPPRESS)
  p.add_argument("--_data", dest="worker_data", help=argparse.SUPPRESS)
  p.add_argument("--_result", dest="worker_result", help=argparse.SUPPRESS)
  p.add_argument("--_device", dest="worker_device", choices=("cpu", "gpu"),
                 help=argparse.SUPPRESS)


def benchmark_config(a: argparse.Namespace) -> Config:
  """The `Config` every pipeline trains with (seed replaced per run).

  The original's recipe: no augmentation (the PyTorch pipelines have none, so
  every pipeline does the same work) and the two cross-entropies alone.
  """
  config = Config().without_augmentation().replace(
      consistency_weight=0.0, epochs=a.epochs, batch_size=a.batch_size)
  if a.quick:
    config = config.replace(eval_batch_size=QUICK_EVAL_BATCH)
  return config


# --- data -------------------------------------------------------------------------


def fake_mnist(num_train: int, num_test: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Arrays shaped like `adder.data.load_mnist`'s: a fixed blob per class plus noise."""
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(0, 255, (10, 28, 28)) * (rng.uniform(size=(10, 28, 28)) > 0.6)

  def split(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = np.clip(patterns[labels] + rng.normal(0, 30, (n, 28, 28)), 0, 255)
    return images.astype(np.uint8), labels

  (train_x, train_y), (test_x, test_y) = split(num_train), split(num_test)
  return {"train_images": train_x, "train_labels": train_y,
          "test_images": test_x, "test_labels": test_y}


def load_dataset(a: argparse.Namespace) -> tuple[dict[str, np.ndarray], str]:
  """The benchmark's data and a description of it; exits with status 2 without MNIST."""
  if a.quick and a.mnist_dir is None:
    return fake_mnist(QUICK_TRAIN, QUICK_TEST), (
        f"fake MNIST-shaped data ({QUICK_TRAIN} train / {QUICK_TEST} test images, --quick)")
  from adder import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    dataset = data_lib.load_mnist(a.mnist_dir, a.data_dir)
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if a.quick:
    dataset = {k: v[:QUICK_TRAIN if k.startswith("train") else QUICK_TEST]
               for k, v in dataset.items()}
    return dataset, (f"MNIST subset (first {QUICK_TRAIN} train / {QUICK_TEST} test "
                     "images, --quick)")
  return dataset, (f"MNIST ({len(dataset['train_labels'])} train / "
                   f"{len(dataset['test_labels'])} test images)")


# --- helpers shared by the workers ------------------------------------------------


def _max_rss_mib() -> float:
  """This process's RSS high-water mark so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_history(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _scores(results: dict[str, Any]) -> dict[str, Any]:
  """The ``final``/``swa`` -> ``test``/``exhaustive`` metrics of a results dict."""
  return {k: results[k] for k in ("final", "swa") if k in results}


def _steady_figures(first_s: float, steady_s: float, calls: int, steps_per_call: int,
                    batch_size: int) -> dict[str, float]:
  per_call = steady_s / calls
  return {"first_call_s": first_s, "steady_s": steady_s,
          "steps": calls * steps_per_call, "steps_per_call": steps_per_call,
          "img_s": calls * steps_per_call * batch_size / steady_s,
          "step_ms": steady_s / (calls * steps_per_call) * 1e3,
          "compile_s": first_s - per_call}



def _training_runs(seeds: int, train: Callable[[int, str], dict[str, Any]]) -> list[dict[str, Any]]:
  """``train(seed, workdir)`` for seeds 0..seeds-1, each in a temporary workdir.

  Returns each run's seed, per-epoch history (``metrics.jsonl``), scores and
  ``wall_seconds``, from the results dictionary `train` returns.
  """
  runs = []
  for seed in range(seeds):
    with tempfile.TemporaryDirectory() as workdir:
      results = train(seed, workdir)
      runs.append({"seed": seed, "history": _read_history(workdir),
                   "scores": _scores(results), "wall_seconds": results["wall_seconds"]})
  return runs

# --- (a) JAX ----------------------------------------------------------------------


def _run_jax(a: argparse.Namespace, dataset: dict[str, np.ndarray]) -> dict[str, Any]:
  """Measurements of adder's JAX trainer: steady steps, evaluation, training runs."""
  from adder import model as model_lib  # pylint: disable=g-import-not-at-top
  from adder import train as train_lib

  config = benchmark_config(a)
  rss_start = _max_rss_mib()
  # Steady state: whole epochs, one jit call each, set up by `train_and_evaluate`'s
  # own `setup`; the first call (compilation and one epoch) is timed apart.
  s, state = train_lib.setup(config, dataset)
  train, state = _jax_steady(s, state, a.steps, config.batch_size)
  evaluation = _jax_evaluation(s, state, dataset, config)
  runs = _training_runs(a.seeds, lambda seed, workdir: train_lib.train_and_evaluate(
      config.replace(seed=seed), workdir, dataset=dataset, write_artifacts=False))
  device_peak = _jax_device_peak_mib()
  return {
      "params": model_lib.count_params(state.params),
      "train": train,
      "eval": evaluation,
      "runs": runs,
      "memory": {"rss_start_mib": rss_start, "peak_rss_mib": _max_rss_mib(),
                 "device_peak_mib": device_peak},
      "info": _jax_info(a),
  }


def _jax_steady(s, state, steps: int, batch_size: int) -> tuple[dict[str, float], Any]:
  """`_steady_figures` of whole epochs (at least `steps` steps) and of lone steps; the new state.

  Args:
    s: `train_lib.setup`'s setup. state: its train state (donated).
  """
  from adder import distributed  # pylint: disable=g-import-not-at-top

  calls = -(-steps // s.steps_per_epoch)

  def epoch(state, e):
    state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, e)
    return state, distributed.to_host(m["loss"])  # the host sync `run_epoch` makes

  t0 = time.perf_counter()
  state, _ = epoch(state, 1)
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  losses = []
  for e in range(2, calls + 2):
    state, loss = epoch(state, e)
    losses.append(loss)
  steady_s = time.perf_counter() - t0
  if not all(np.all(np.isfinite(x)) for x in losses):
    raise FloatingPointError("JAX timing epochs gave a non-finite loss")
  train = _steady_figures(first_s, steady_s, calls, s.steps_per_epoch, batch_size)
  train["lone_step_ms"], state = _lone_step_ms(s, state, min(steps, 100), batch_size)
  return train, state


def _jax_evaluation(s, state, dataset: dict[str, np.ndarray], config: Config) -> dict[str, Any]:
  """Evaluation throughput on the exhaustive set, in `train_and_evaluate`'s batches."""
  from adder import data as data_lib  # pylint: disable=g-import-not-at-top

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  num_test = len(dataset["test_labels"])
  s.evaluate(variables, image_index=np.arange(num_test, dtype=np.int32),
             numbers=data_lib.test_numbers(num_test, config.eval_seed))  # compiles
  ex_index, ex_nums = data_lib.exhaustive_pairs(num_test)
  t0 = time.perf_counter()
  s.evaluate(variables, image_index=ex_index, numbers=ex_nums)
  eval_s = time.perf_counter() - t0
  return {"cases": len(ex_index), "seconds": eval_s, "img_s": len(ex_index) / eval_s,
          "batch_size": config.eval_batch_size}


def _jax_device_peak_mib() -> Optional[float]:
  """The accelerator's peak memory in use so far (MiB); None on the CPU or where unknown."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.default_backend() == "cpu":
    return None
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _jax_info(a: argparse.Namespace) -> dict[str, Any]:
  """Backend, devices, convolutions, XLA flags and versions of the JAX worker."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax
  import jaxlib
  import optax

  from adder import conv_cpu

  backend = jax.default_backend()
  return {"backend": backend, "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "device_choice": a.device_choice,
          "convolutions": conv_cpu.describe() if backend == "cpu" else "XLA's",
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "versions": {"python": platform.python_version(), "jax": jax.__version__,
                       "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                       "optax": optax.__version__, "numpy": np.__version__}}


def _lone_step_ms(s, state, steps: int, batch_size: int):
  """Milliseconds per `train_batch` jitted alone, one call per step, as a check on the scan.

  A lone step and a step inside `train_epoch`'s scan should cost the same; a
  scan much slower than this means a fall-back to a slow path inside loops.
  Returns the milliseconds and the state (the one given is donated).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from adder import data as data_lib
  from adder import step as step_lib
  step = jax.jit(step_lib.train_batch, donate_argnums=0, static_argnames="batch_sharding")
  indices, numbers = data_lib.epoch_plan(s.data_key, 0, s.train_x.shape[0], batch_size)
  run = lambda state, k: step(state, s.train_x, s.train_y, indices[k], numbers[k],  # noqa: E731
                              batch_sharding=s.batch_sharding)
  state, m = run(state, 0)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for k in range(1, steps + 1):
    state, m = run(state, k % indices.shape[0])
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / steps * 1e3, state


# --- (b), (c) PyTorch -------------------------------------------------------------


def _load_torch_reference():
  sys.path.insert(0, os.path.dirname(SCRIPT))
  import torch_reference  # pylint: disable=g-import-not-at-top
  return torch_reference


def _run_torch(a: argparse.Namespace, dataset: dict[str, np.ndarray], pipeline: str,
               device_name: str) -> dict[str, Any]:
  """Measurements of the PyTorch reference with one pipeline (``dataloader``/``inmemory``)."""
  import torch  # pylint: disable=g-import-not-at-top

  ref = _load_torch_reference()
  config = benchmark_config(a)
  rss_start = _max_rss_mib()
  device = torch.device(device_name)
  if device.type == "cpu":
    torch.set_num_threads(usable_cores())  # one intra-op thread per core
  run, stream = _torch_stream(ref, a, dataset, pipeline, config, device)
  train = _torch_steady(ref, run, stream, a.steps, config.batch_size, device, pipeline)
  # Evaluation does not depend on the training pipeline: measured once, in (c).
  evaluation = _torch_evaluation(ref, run, dataset, config) if pipeline == "inmemory" else None
  runs = _training_runs(a.seeds, lambda seed, workdir: ref.train(
      config.replace(seed=seed), workdir, dataset=dataset, pipeline=pipeline,
      num_workers=a.num_workers, device=device_name))
  return {
      "params": sum(p.numel() for p in run.model.parameters()),
      "train": train,
      "eval": evaluation,
      "runs": runs,
      "memory": {"rss_start_mib": rss_start, "peak_rss_mib": _max_rss_mib(),
                 "device_peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                     if device.type == "cuda" else None)},
      "info": {"device": str(device), "threads": torch.get_num_threads(),
               "interop_threads": torch.get_num_interop_threads(),
               "num_workers": a.num_workers,
               "gpu": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else None),
               "versions": {"torch": torch.__version__}},
  }


def _torch_stream(ref, a: argparse.Namespace, dataset: dict[str, np.ndarray], pipeline: str,
                  config: Config, device) -> tuple[Any, Iterator[tuple]]:
  """A reference training run long enough for the timed steps, and its endless batches.

  Batches (images, numbers, digits, sums) on `device`, made as
  `torch_reference.train_epoch_in_memory` / `train_epoch_dataloader` make
  them, across epoch ends. The data is on the device (in memory) or the
  DataLoader built before this returns; batches are drawn when asked for.
  """
  train_x, train_y = dataset["train_images"], dataset["train_labels"]
  n, batch_size = len(train_y), config.batch_size
  steps_per_epoch = n // batch_size
  run = ref.create_run(config.replace(epochs=-(-(a.steps + 1) // steps_per_epoch)),
                       steps_per_epoch, device=device)
  if pipeline == "inmemory":
    return run, _in_memory_batches(ref, train_x, train_y, steps_per_epoch, batch_size,
                                   config.seed, device)
  loader = ref.make_loader(train_x, train_y, batch_size, seed=config.seed,
                           num_workers=a.num_workers)

  def batches():
    while True:
      for (images, nums), (digits, sums) in loader:
        yield (images.to(device, non_blocking=True), nums.to(device, non_blocking=True),
               digits.to(device, non_blocking=True), sums.to(device, non_blocking=True))

  return run, batches()


def _in_memory_batches(ref, train_x: np.ndarray, train_y: np.ndarray, steps_per_epoch: int,
                       batch_size: int, seed: int, device) -> Iterator[tuple]:
  """The in-memory pipeline's batches: the training set moved to `device` now, indexed per batch."""
  import torch  # pylint: disable=g-import-not-at-top

  n = len(train_y)
  images = ref.normalize_images(torch.as_tensor(train_x)).to(device)
  labels = torch.as_tensor(train_y, dtype=torch.int64).to(device)
  generator = torch.Generator().manual_seed(seed)

  def batches():
    while True:
      perm = torch.randperm(n, generator=generator)[: steps_per_epoch * batch_size]
      perm = perm.view(steps_per_epoch, batch_size).to(device)
      nums = torch.randint(ref.NUM_DIGITS, (steps_per_epoch, batch_size),
                           generator=generator)
      nums = nums.to(device)
      for idx, num in zip(perm, nums):
        digits = labels[idx]
        yield images[idx], num, digits, digits + num

  return batches()


def _torch_steady(ref, run, stream: Iterator[tuple], steps: int, batch_size: int, device,
                  pipeline: str) -> dict[str, float]:
  """`_steady_figures` of `steps` calls of `torch_reference.train_step`, after a first one."""
  import torch  # pylint: disable=g-import-not-at-top

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize(device)

  t0 = time.perf_counter()
  float(ref.train_step(run, *next(stream)))
  sync()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  losses = [ref.train_step(run, *next(stream)) for _ in range(steps)]
  mean_loss = float(torch.stack(losses).mean())  # host sync, as the reference's epochs
  sync()
  steady_s = time.perf_counter() - t0
  if not math.isfinite(mean_loss):
    raise FloatingPointError(f"PyTorch ({pipeline}) timing steps gave loss {mean_loss}")
  return _steady_figures(first_s, steady_s, steps, 1, batch_size)


def _torch_evaluation(ref, run, dataset: dict[str, np.ndarray], config: Config) -> dict[str, Any]:
  """`torch_reference.evaluate`'s throughput on the exhaustive set, after a warm-up."""
  from adder import data as data_lib  # pylint: disable=g-import-not-at-top

  test_x, test_y = dataset["test_images"], dataset["test_labels"]
  num_test = len(test_y)
  ref.evaluate(run.model, test_x, test_y, np.arange(num_test, dtype=np.int32),
               data_lib.test_numbers(num_test, config.eval_seed),
               config.eval_batch_size)  # warm-up
  ex_index, ex_nums = data_lib.exhaustive_pairs(num_test)
  t0 = time.perf_counter()
  ref.evaluate(run.model, test_x, test_y, ex_index, ex_nums, config.eval_batch_size)
  eval_s = time.perf_counter() - t0
  return {"cases": len(ex_index), "seconds": eval_s,
          "img_s": len(ex_index) / eval_s, "batch_size": config.eval_batch_size}


def _run_worker(a: argparse.Namespace) -> int:
  """Subprocess entry: measure one pipeline, write its figures to ``--_result``."""
  with np.load(a.worker_data) as f:
    dataset = {k: f[k] for k in f.files}
  if a.worker == "jax":
    from adder import conv_cpu  # pylint: disable=g-import-not-at-top
    from adder import devices
    a.device_choice = (devices.configure_cpu_devices(a.batch_size)
                       if a.worker_device == "cpu" else "JAX defaults")
    with conv_cpu.use_kernels(not a.xla_convolutions):
      result = _run_jax(a, dataset)
  else:
    pipeline = a.worker.split("_", 1)[1]
    result = _run_torch(a, dataset, pipeline, "cuda" if a.worker_device == "gpu" else "cpu")
  with open(a.worker_result, "w") as f:
    json.dump(result, f)
  return 0


# --- the parent: choose the device, run the workers, write the report -------------


def _probe(code: str, env: dict[str, str]) -> str:
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=False)
  return out.stdout.strip()


def choose_device(requested: str) -> str:
  """``gpu`` if both frameworks see a GPU (``auto``/``gpu``), else ``cpu``.

  Probed in subprocesses, so that this process holds no GPU memory; skipped
  when no NVIDIA device node exists.
  """
  if requested == "cpu":
    return "cpu"
  if not glob.glob("/dev/nvidia[0-9]*"):
    jax_gpu = torch_gpu = False
  else:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    jax_gpu = _probe("import jax; print(jax.default_backend())", env) == "gpu"
    torch_gpu = _probe("import torch; print(torch.cuda.is_available())", env) == "True"
  if jax_gpu and torch_gpu:
    return "gpu"
  if requested == "gpu":
    raise SystemExit(f"error: --device gpu: JAX sees a GPU: {jax_gpu}, PyTorch sees "
                     f"one: {torch_gpu}; both must")
  return "cpu"


def usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def command_line(argv: list[str]) -> str:
  """The command as typed from the repository root, with XLA_FLAGS if set."""
  env = f"XLA_FLAGS={shlex.quote(os.environ['XLA_FLAGS'])} " if os.environ.get(
      "XLA_FLAGS") else ""
  return f"{env}python {os.path.relpath(SCRIPT, _REPO_ROOT)} {shlex.join(argv)}".rstrip()


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
  values = [float(v) for v in values]
  return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def time_to_target(history: list[dict[str, Any]],
                   target: float = TARGET_JOINT_ACC) -> Optional[tuple[int, float]]:
  """(epochs, training seconds) until test joint accuracy first reaches `target`, or None.

  The seconds are the sum of the per-epoch training times up to that epoch
  (evaluation excluded; the first epoch's includes any compilation).
  """
  seconds = 0.0
  for row in history:
    seconds += row["seconds"]
    if row["test_joint_acc"] >= target:
      return row["epoch"], seconds
  return None


def summarise(w: dict[str, Any], epochs: int, images_per_epoch: int) -> dict[str, Any]:
  """One worker's measurements reduced to the figures of the tables.

  ``images_per_epoch``: the training images one epoch steps through (whole batches).
  """
  runs = w["runs"]
  steady_epochs = [row["seconds"] for r in runs for row in r["history"]
                   if epochs == 1 or row["epoch"] > 1]
  reached = [t for t in (time_to_target(r["history"]) for r in runs) if t is not None]
  epoch_s = float(np.median(steady_epochs))
  s = {
      "epoch_img_s": images_per_epoch / epoch_s,
      "epochs_timed": len(steady_epochs),
      "train_img_s": w["train"]["img_s"],
      "compile_s": w["train"]["compile_s"],
      "epoch_s": epoch_s,
      "first_epoch_s": float(np.mean([r["history"][0]["seconds"] for r in runs])),
      "wall_s": float(np.mean([r["wall_seconds"] for r in runs])),
      "step_ms": w["train"]["step_ms"],
      "lone_step_ms": w["train"].get("lone_step_ms"),
      "eval_img_s": w["eval"]["img_s"] if w["eval"] else None,
      "reached_99": len(reached),
      "epochs_to_99": float(np.mean([e for e, _ in reached])) if reached else None,
      "seconds_to_99": float(np.mean([t for _, t in reached])) if reached else None,
      "peak_rss_mib": w["memory"]["peak_rss_mib"],
      "rss_start_mib": w["memory"]["rss_start_mib"],
      "device_peak_mib": w["memory"]["device_peak_mib"],
      "params": w["params"],
      "accuracy": {},
  }
  for weights in ("final", "swa"):
    if all(weights in r["scores"] for r in runs):
      for split, metric in (("test", "joint_acc"), ("exhaustive", "digit_acc"),
                            ("exhaustive", "sum_acc"), ("exhaustive", "joint_acc"),
                            ("exhaustive", "consistency")):
        s["accuracy"][f"{weights}_{split}_{metric}"] = _mean_std(
            [r["scores"][weights][split][metric] for r in runs])
  return s


def flat_figures(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The JSON figures: ``{worker}_{figure}`` plus ``jax_eval_img_s``/``torch_eval_img_s``."""
  out: dict[str, Any] = {}
  for name, s in summaries.items():
    for key, value in s.items():
      if key == "accuracy":
        for acc, (mean, std) in value.items():
          out[f"{name}_{acc}_mean"] = mean
          out[f"{name}_{acc}_std"] = std
      elif key != "eval_img_s":
        out[f"{name}_{key}"] = value
  out["jax_eval_img_s"] = summaries["jax"]["eval_img_s"]
  out["torch_eval_img_s"] = summaries["torch_inmemory"]["eval_img_s"]
  for other in ("torch_dataloader", "torch_inmemory"):
    for figure in ("epoch_img_s", "train_img_s"):
      out[f"jax_over_{other}_{figure}"] = out[f"jax_{figure}"] / out[f"{other}_{figure}"]
  out["jax_over_torch_eval_img_s"] = out["jax_eval_img_s"] / out["torch_eval_img_s"]
  return out


# The figures `summarise` gives each worker, as `flat_figures` writes them (``{worker}_{key}``).
SUMMARY_KEYS = ("epoch_img_s", "epochs_timed", "train_img_s", "compile_s", "epoch_s",
                "first_epoch_s", "wall_s", "step_ms", "lone_step_ms", "reached_99",
                "epochs_to_99", "seconds_to_99", "peak_rss_mib", "rss_start_mib",
                "device_peak_mib", "params")


def from_figures(figures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """`render_markdown`'s (meta, summaries) from a ``--json`` file (`flat_figures` undone).

  A figure the run did not record (an older version of this script) is None.
  """
  eval_img_s = {"jax": figures.get("jax_eval_img_s"),
                "torch_inmemory": figures.get("torch_eval_img_s")}
  summaries = {}
  for name in WORKERS:
    prefix = f"{name}_"
    s = {key: figures.get(prefix + key) for key in SUMMARY_KEYS}
    s["eval_img_s"] = eval_img_s.get(name)
    s["accuracy"] = {}
    for key, mean in figures.items():
      acc = key[len(prefix):-len("_mean")]
      if key.startswith(prefix) and key.endswith("_mean") and acc.startswith(("final_", "swa_")):
        s["accuracy"][acc] = (mean, figures.get(f"{prefix}{acc}_std"))
    summaries[name] = s
  summaries["jax"]["steps"] = figures.get("jax_steps")
  meta = dict(figures["meta"], jax_info=figures["meta"]["jax"],
              torch_info=figures["meta"]["torch"])
  return meta, summaries


def _render_saved(a: argparse.Namespace) -> int:
  """``--from-json``: an earlier run's section, printed, and written into ``--out`` if given."""
  with open(a.from_json) as f:
    meta, summaries = from_figures(json.load(f))
  _publish(a, meta, summaries)
  return 0


def _publish(a: argparse.Namespace, meta: dict[str, Any],
             summaries: dict[str, dict[str, Any]]) -> None:
  """Print the run's section, and write it into ``--out`` (its CPU or GPU section) if given."""
  markdown = render_markdown(meta, summaries)
  print(markdown, flush=True)
  if a.out:
    write_section(a.out, meta["device"] + ("-quick" if meta["quick"] else ""), markdown)
    print(f"wrote {a.out}", flush=True)


def _fmt(value: Optional[float], kind: str) -> str:
  if value is None:
    return "—"
  return {"rate": f"{value:,.0f}", "s": f"{value:.2f}", "mib": f"{value:,.0f}",
          "int": f"{value:,.0f}", "epochs": f"{value:.1f}", "acc": f"{value:.4f}"}[kind]


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  # A first-call overhead can come out at or below zero (no compilation, noise).
  return "—" if a is None or b is None or a <= 0 or b <= 0 else f"{a / b:.2f}×"


def render_markdown(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> str:
  """The section for this run: set-up, speed and memory table, accuracy table, notes."""
  return "\n".join(_setup_lines(meta, summaries) + _speed_table(meta, summaries)
                   + _accuracy_table(meta, summaries) + _notes(meta["device"].upper()))


def _setup_lines(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
  """The section's heading and its bullets: command, date, machine, versions, settings, data."""
  ji, ti = meta["jax_info"], meta["torch_info"]
  section = meta["device"].upper()
  seeds, epochs = meta["seeds"], meta["epochs"]
  return [
      f"## {section}: {meta['gpu'] if section == 'GPU' else meta['cpu']}"
      + (" (--quick, not a measurement)" if meta["quick"] else ""),
      "",
      f"- Command (from the repository root): `{meta['command']}`",
      f"- Date: {meta['date']}",
      f"- Machine: CPU {meta['cpu']}, {meta['cores']} cores ({meta['usable_cores']} usable "
      f"by this process); GPU: {meta['gpu'] or 'none used'}",
      "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
      f"- JAX: backend {ji['backend']}, devices {', '.join(ji['devices'])} "
      f"(`adder.devices`: {ji['device_choice']}; `adder.conv_cpu`: "
      f"{ji.get('convolutions', 'not recorded')}); one jit call per epoch "
      f"(`adder.step.train_epoch`); XLA_FLAGS "
      f"{'`' + ji['xla_flags'] + '`' if ji['xla_flags'] else 'unset'}",
      f"- PyTorch: device {ti['device']}, {ti['threads']} threads "
      f"(`torch.get_num_threads()`), {ti['interop_threads']} inter-op threads; "
      f"DataLoader workers for (b): {ti['num_workers']}",
      f"- Data: {meta['data']}",
      f"- Runs: batch size {meta['batch_size']}, {epochs} epoch(s), seeds "
      f"0..{seeds - 1} per pipeline; steady state timed over {summaries['jax']['steps']} steps "
      f"(JAX, whole epochs) / {meta['steps']} steps (PyTorch) after a first call "
      f"timed apart; "
      f"evaluation batch {meta['eval_batch_size']}",
      "",
  ]


def _speed_row(name: str, summaries: dict[str, dict[str, Any]], key: str, kind: str,
               better: str) -> str:
  """A row of the speed table: figure `key` of (a), (b), (c), (a)/(b), (a)/(c), which is better."""
  a, b, c = (summaries[k][key] for k in WORKERS)
  return (f"| {name} | {_fmt(a, kind)} | {_fmt(b, kind)} | {_fmt(c, kind)} | "
          f"{_ratio(a, b)} | {_ratio(a, c)} | {better} |")


def _speed_table(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
  """The speed and memory table: throughput, compilation, epoch and wall times, memory."""
  jx = summaries["jax"]
  seeds, epochs = meta["seeds"], meta["epochs"]
  row = functools.partial(_speed_row, summaries=summaries)
  median_of = (f"median of {jx['epochs_timed']} epochs" if epochs == 1 else
               f"median of epochs 2+ of {seeds} run(s), {jx['epochs_timed']} epochs")
  lines = [
      "### Speed and memory",
      "",
      f"| figure | {LABELS['jax']} | {LABELS['torch_dataloader']} | "
      f"{LABELS['torch_inmemory']} | (a)/(b) | (a)/(c) | better |",
      "|---|---:|---:|---:|---:|---:|---|",
      row(f"training throughput, training runs' epochs ({median_of}; images/s)",
          key="epoch_img_s", kind="rate", better="higher"),
      row("training throughput, one steady-state window (images/s)", key="train_img_s",
          kind="rate", better="higher"),
      row("compilation / first-call overhead (s)", key="compile_s", kind="s", better="lower"),
      row("seconds per epoch" + (" (median of epochs 2+)" if epochs > 1 else
                                 " (epoch 1, with compilation)"),
          key="epoch_s", kind="s", better="lower"),
  ]
  if epochs > 1:
    lines.append(row("first epoch of the training runs, compiled anew after the throughput phase (s)", key="first_epoch_s", kind="s",
                     better="lower"))
  lines.append(row(f"full recipe wall time, {epochs} epoch(s) with per-epoch and final "
                   "evaluation (s)", key="wall_s", kind="s", better="lower"))
  lines += _evaluation_and_target_rows(meta, summaries)
  lines.append(
      f"| JAX only: ms per step inside the epoch's scan / jitted alone, one call per "
      f"step (a slow path inside loops would make the first several times the "
      f"second) | {_fmt(jx['step_ms'], 's')} / {_fmt(jx['lone_step_ms'], 's')} | — | — "
      f"| — | — | lower first |")
  lines.append(row("peak RSS of the framework's process (MiB)", key="peak_rss_mib",
                   kind="mib", better="lower"))
  lines.append(row("RSS after imports and data load (MiB)", key="rss_start_mib", kind="mib",
                   better="lower"))
  if meta["device"].upper() == "GPU":
    lines.append(row("peak device memory (MiB)", key="device_peak_mib", kind="mib",
                     better="lower"))
  lines.append(row("parameters", key="params", kind="int", better="equal"))
  return lines


def _evaluation_and_target_rows(meta: dict[str, Any],
                                summaries: dict[str, dict[str, Any]]) -> list[str]:
  """The speed table's rows of evaluation throughput and of time to the target accuracy."""
  jx, dl, im = (summaries[k] for k in WORKERS)
  seeds = meta["seeds"]
  jax_eval, torch_eval = jx["eval_img_s"], im["eval_img_s"]
  lines = [
      f"| evaluation throughput, exhaustive set of {meta['exhaustive_cases']:,} cases "
      f"(cases/s; one PyTorch measurement, shown under (b) and (c)) | "
      f"{_fmt(jax_eval, 'rate')} | {_fmt(torch_eval, 'rate')} | {_fmt(torch_eval, 'rate')} | "
      f"{_ratio(jax_eval, torch_eval)} | {_ratio(jax_eval, torch_eval)} | higher |"]
  reach = {k: (f" ({s['reached_99']}/{seeds} seeds)" if 0 < s["reached_99"] < seeds else "")
           for k, s in summaries.items()}
  for name, key, kind in (("epochs", "epochs_to_99", "epochs"),
                          ("training seconds", "seconds_to_99", "s")):
    cells = [(_fmt(s[key], kind) + reach[k]) if s[key] is not None else "not reached"
             for k, s in summaries.items()]
    lines.append(f"| time to {TARGET_JOINT_ACC:.0%} test joint accuracy: {name} | "
                 f"{' | '.join(cells)} | {_ratio(jx[key], dl[key])} | "
                 f"{_ratio(jx[key], im[key])} | lower |")
  return lines


# The accuracy table's row names, by metric.
ACCURACY_NAMES = {"test_joint_acc": "test pairs, joint",
                  "exhaustive_digit_acc": "exhaustive, digit",
                  "exhaustive_sum_acc": "exhaustive, sum",
                  "exhaustive_joint_acc": "exhaustive, joint",
                  "exhaustive_consistency": "exhaustive, consistency"}


def _accuracy_table(meta: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
  """The accuracy table: each weights' and metric's mean ± std over the seeds, per pipeline."""
  jx, dl, im = (summaries[k] for k in WORKERS)
  seeds, epochs = meta["seeds"], meta["epochs"]
  over = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "1 seed"
  lines = [
      "",
      f"### Accuracy ({over}, {epochs} epoch(s))",
      "",
      f"| figure | {LABELS['jax']} | {LABELS['torch_dataloader']} | "
      f"{LABELS['torch_inmemory']} | (a)/(b) | (a)/(c) |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for key in jx["accuracy"]:
    if not all(key in s["accuracy"] for s in summaries.values()):
      continue
    weights, metric = key.split("_", 1)
    cells = []
    for s in summaries.values():
      mean, std = s["accuracy"][key]
      cells.append(_fmt(mean, "acc") + (f" ± {std:.4f}" if std is not None else ""))
    a_mean = jx["accuracy"][key][0]
    lines.append(f"| {weights} weights, {ACCURACY_NAMES[metric]} | {' | '.join(cells)} | "
                 f"{_ratio(a_mean, dl['accuracy'][key][0])} | "
                 f"{_ratio(a_mean, im['accuracy'][key][0])} |")
  return lines


def _notes(section: str) -> list[str]:
  """How each figure is measured (``section``: CPU or GPU, which adds device memory)."""
  return [
      "",
      "How each figure is measured:",
      "",
      "- Each pipeline runs in its own subprocess, one after the other, on the same data "
      "and `adder.config.Config` (model, batch size, epochs, optimizer, SWA), without "
      "augmentation or the consistency term (the original's recipe, which the PyTorch "
      "pipelines follow).",
      "- Training throughput, training runs' epochs: the images of one epoch over the "
      "median of the per-epoch training times that the training runs log (below), "
      "epochs 2+ of every seed: many samples spread over each pipeline's runs, so the "
      "steadiest comparison on a shared machine.",
      "- Training throughput, one steady-state window: images per second over the "
      "steady-state steps, timed "
      "from after the first call to a host sync at the end; a single window of "
      "seconds, so it moves with whatever else the machine does. JAX: whole epochs of "
      "`train_epoch` (the epoch's plan drawn on the device, then a `lax.scan` of "
      "`train_batch`), jitted with the state donated, exactly as `adder.train`'s "
      "loop. PyTorch: `torch_reference.train_step` on batches built as the "
      "reference's epochs build them (DataLoader over `MNISTAdder`, or indexing "
      "tensors in memory).",
      "- Compilation / first-call overhead: the first call's time minus the steady "
      "time per call (JAX: tracing and XLA compilation; PyTorch: warm-up and, for "
      "(b), starting the DataLoader iterator).",
      "- Seconds per epoch and time to 99%: from the training runs (`adder.train."
      "train_and_evaluate`, `torch_reference.train`), the per-epoch training time "
      "each logs (evaluation excluded); time to 99% adds them up to the first epoch "
      "whose test-pair joint accuracy reaches 99%, averaged over the seeds that "
      "reach it. Full recipe wall time: each training run's `wall_seconds`, from the "
      "data in host memory to the final scores (compilation, every epoch and its "
      "evaluation, the SWA BatchNorm recompute, the final evaluation), averaged over "
      "the seeds.",
      "- Evaluation throughput: after a warm-up on the test pairs, one pass of "
      "`adder.evaluation.evaluate` / `torch_reference.evaluate` (eval mode, predictions "
      "and metrics) over the exhaustive set.",
      "- Memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of each pipeline's own "
      "process at its end, a process-wide high-water mark over imports, data, timing, "
      "evaluation and every training run (DataLoader worker processes, if any, are "
      "not included)" + (
          "; device memory: JAX's `memory_stats()['peak_bytes_in_use']`, PyTorch's "
          "`torch.cuda.max_memory_allocated()`" if section == "GPU" else "") + ".",
      "- Ratios are (a) divided by (b) or (c); the last column says which direction "
      "is better for (a).",
      "",
  ]


def write_section(path: str, key: str, text: str) -> None:
  """Put `text` into `path` between this section's markers, keeping other sections."""
  begin, end = f"<!-- benchmark:{key}:begin -->", f"<!-- benchmark:{key}:end -->"
  block = f"{begin}\n{text.rstrip()}\n{end}\n"
  old = FILE_HEADER
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  if begin in old and end in old:
    head, rest = old.split(begin, 1)
    new = head + block + rest.split(end, 1)[1].lstrip("\n")
  else:
    new = old.rstrip("\n") + "\n\n" + block
  with open(path, "w") as f:
    f.write(new)


def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  a = parse_args(argv)
  if a.worker:
    return _run_worker(a)
  if a.from_json:
    return _render_saved(a)

  device = choose_device(a.device)
  dataset, data_desc = load_dataset(a)
  workers = _run_workers(argv, device, dataset)
  if workers is None:
    return 1
  params = {k: w["params"] for k, w in workers.items()}
  if len(set(params.values())) != 1:
    print(f"error: the models differ in size: {params}", file=sys.stderr)
    return 1
  images_per_epoch = len(dataset["train_labels"]) // a.batch_size * a.batch_size
  summaries = {k: summarise(w, a.epochs, images_per_epoch) for k, w in workers.items()}
  summaries["jax"]["steps"] = workers["jax"]["train"]["steps"]
  meta = _run_meta(a, argv, device, data_desc, workers)
  _publish(a, meta, summaries)
  if a.json:
    figures = flat_figures(summaries)
    figures["meta"] = {k: v for k, v in meta.items() if k not in ("jax_info", "torch_info")}
    figures["meta"].update(jax=meta["jax_info"], torch=meta["torch_info"])
    with open(a.json, "w") as f:
      json.dump(figures, f, indent=2)
    print(f"wrote {a.json}", flush=True)
  return 0


def _run_workers(argv: list[str], device: str,
                 dataset: dict[str, np.ndarray]) -> Optional[dict[str, dict[str, Any]]]:
  """Each of `WORKERS` in its own subprocess, in turn: ``{worker: figures}``; None if one fails."""
  env = dict(os.environ)
  if device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  workers = {}
  with tempfile.TemporaryDirectory() as tmp:
    data_path = os.path.join(tmp, "data.npz")
    np.savez(data_path, **dataset)
    for name in WORKERS:
      print(f"=== {LABELS[name]} ===", flush=True)
      result_path = os.path.join(tmp, f"{name}.json")
      t0 = time.perf_counter()
      rc = subprocess.run(
          [sys.executable, SCRIPT, *argv, "--_worker", name, "--_data", data_path,
           "--_result", result_path, "--_device", device], env=env, check=False).returncode
      print(f"=== {LABELS[name]}: {time.perf_counter() - t0:.0f} s ===", flush=True)
      if rc != 0:
        print(f"error: the {LABELS[name]} run failed (exit {rc}); its output is above",
              file=sys.stderr)
        return None
      with open(result_path) as f:
        workers[name] = json.load(f)
  return workers


def _run_meta(a: argparse.Namespace, argv: list[str], device: str, data_desc: str,
              workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """`render_markdown`'s meta: the command, date, machine, versions and settings of this run."""
  ji, ti = workers["jax"]["info"], workers["torch_inmemory"]["info"]
  return {
      "device": device, "quick": a.quick, "command": command_line(argv),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu": cpu_model(), "cores": os.cpu_count(),
      "usable_cores": usable_cores(),
      "gpu": ti["gpu"] if device == "gpu" else None,
      "versions": {**ji["versions"], **ti["versions"]},
      "jax_info": ji, "torch_info": ti, "data": data_desc,
      "batch_size": a.batch_size, "epochs": a.epochs, "seeds": a.seeds, "steps": a.steps,
      "eval_batch_size": benchmark_config(a).eval_batch_size,
      "exhaustive_cases": workers["jax"]["eval"]["cases"],
  }


if __name__ == "__main__":
  sys.exit(main())
