"""The MNIST adder in plain PyTorch: the recipe without augmentation, for parity and baselines.

Command (from the repository root):

    python experiments/torch_reference.py --epochs 1 --workdir runs/torch_reference \
        --mnist-dir ../shared/mnist

Last produced (CPU: 2 cores shared with other jobs; PyTorch 2.13.0+cpu, 2 threads;
default ``--pipeline dataloader`` with 0 workers; 1 epoch = 468 steps of 128,
peak lr 0.1 (then the default);
11 minutes in all, 334 s of them training):

    epoch  1/1  loss 1.3757  test digit 0.9878 sum 0.9868 joint 0.9833  334.2s
    final  test joint 0.9833  exhaustive: digit 0.9883 sum 0.9860 joint 0.9836 consistency 0.9916
    swa    test joint 0.9837  exhaustive: digit 0.9882 sum 0.9865 joint 0.9838 consistency 0.9918

What it is: the same network as `adder.model.AdderNet` (`TorchAdderNet`, whose
submodule names match the Flax ones so that `adder.convert` maps weights one to
one), the original data recipe (`MNISTAdder`, a Dataset drawing a fresh integer
per ``__getitem__``, behind a DataLoader) and the same optimisation recipe as
`adder.train`, every hyperparameter read from `adder.config.Config`:
cross-entropy on both heads summed, plus the consistency term when
``consistency_weight`` is not 0 (``--consistency-weight 0``: the original's
loss); ``SGD(momentum, weight_decay)`` stepped by ``OneCycleLR`` with momentum
cycling; ``AveragedModel`` updated after every
optimizer step from step ``round(swa_start_frac * total_steps)`` on (with
``swa_lr`` set, ``OneCycleLR`` spans the steps before it and the averaged
steps run at ``swa_lr``), then ``update_bn`` over the training set in order.
MNIST comes through `adder.data.load_mnist` (no torchvision); evaluation uses
the same fixed pairs and `adder.metrics`, and ``results.json`` has the same
keys as `adder.train`'s.

Two input pipelines, ``--pipeline``:
* ``dataloader``: the original, a ``DataLoader`` over `MNISTAdder`
  (``--num-workers`` processes, each reseeded, see `seed_worker`);
* ``inmemory``: the whole normalised training set as one tensor, batches by
  indexing (`train_epoch_in_memory`): no per-sample Python work.

The pieces (`create_run`, `train_step`, `train_epoch_in_memory`,
`train_epoch_dataloader`, `finish_swa`, `evaluate`, `train`) are importable,
so that the parity tests and the benchmark drive and time them directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.optim.swa_utils import AveragedModel, update_bn

# Run as a script from the repository root: make `adder` importable uninstalled.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from adder import data as data_lib  # noqa: E402
from adder import metrics as metrics_lib  # noqa: E402
from adder import optim as optim_lib  # noqa: E402
from adder import config as config_lib  # noqa: E402
from adder.config import Config  # noqa: E402
from adder.convert import torch_bn_momentum  # noqa: E402
from adder.model import MNIST_MEAN, MNIST_STD, NUM_DIGITS, NUM_SUMS  # noqa: E402

POOL_AFTER = (1, 3)  # 2x2 max pooling after these conv blocks, as in AdderNet


def normalize_images(images_u8: torch.Tensor) -> torch.Tensor:
  """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), as `adder.model.normalize_images`."""
  x = images_u8.to(torch.float32).unsqueeze(1)
  return (x / 255.0 - MNIST_MEAN) / MNIST_STD


class TorchAdderNet(nn.Module):
  """`adder.model.AdderNet` in PyTorch: (image, integer) -> (digit, sum) logits.

  Submodules are named like the Flax ones (``conv0..conv4``, ``bn0..bn4``,
  ``fc0``, ``fc1``, ``digit_head``, ``sum_head``); see `adder.convert`.
  """

  def __init__(self, config: Config = Config()):
    super().__init__()
    self.num_blocks = len(config.conv_features)
    channels = 1
    for i, features in enumerate(config.conv_features):
      self.add_module(f"conv{i}", nn.Conv2d(channels, features, 3, bias=False))
      self.add_module(f"bn{i}", nn.BatchNorm2d(
          features, eps=config.bn_epsilon, momentum=torch_bn_momentum(config.bn_momentum)))
      channels = features
    self.relu = nn.ReLU()
    self.pool = nn.MaxPool2d(2)
    self.fc0 = nn.Linear(channels + NUM_DIGITS, config.hidden_features)
    self.fc1 = nn.Linear(config.hidden_features, config.hidden_features)
    self.digit_head = nn.Linear(config.hidden_features, NUM_DIGITS)
    self.sum_head = nn.Linear(config.hidden_features, NUM_SUMS)

  def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs: ``(images float32 (N, 1, 28, 28) normalised, numbers int64 (N,))``.

    One argument, a pair, so that ``update_bn`` can call the model on the
    first element of each ``((image, n), (digit, sum))`` batch.
    """
    x, numbers = inputs
    for i in range(self.num_blocks):
      x = self.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
      if i in POOL_AFTER:
        x = self.pool(x)
    embedding = x.mean(dim=(2, 3))  # (N, 20)
    h = torch.cat([embedding, F.one_hot(numbers, NUM_DIGITS).float()], dim=1)  # (N, 30)
    h = self.relu(self.fc0(h))
    h = self.relu(self.fc1(h))
    return self.digit_head(h), self.sum_head(h)


class MNISTAdder(torch.utils.data.Dataset):
  """The original data recipe: item i is ``((image, n), (digit, digit + n))``.

  ``image`` float32 (1, 28, 28) normalised; ``n`` a fresh uniform integer 0..9
  drawn at every call from this dataset's own generator (so an image meets new
  integers each epoch). Behind a DataLoader with workers, each worker must
  reseed that generator (`seed_worker`), or they would all draw the same
  integers from the copy they inherited.
  """

  def __init__(self, images_u8: np.ndarray, labels: np.ndarray, seed: int = 0):
    self.images = torch.as_tensor(np.asarray(images_u8, np.uint8))  # (N, 28, 28)
    self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    self.generator = torch.Generator().manual_seed(seed)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int):
    n = int(torch.randint(NUM_DIGITS, (), generator=self.generator))
    digit = int(self.labels[i])
    return (normalize_images(self.images[i][None])[0], n), (digit, digit + n)


def seed_worker(worker_id: int) -> None:
  """DataLoader ``worker_init_fn``: a distinct integer stream per worker and epoch.

  ``get_worker_info().seed`` is the loader's base seed (drawn from its
  generator each time an iterator starts, i.e. each epoch) plus the worker id.
  """
  del worker_id
  info = torch.utils.data.get_worker_info()
  info.dataset.generator.manual_seed(info.seed)


def make_loader(
    images_u8: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
  """A DataLoader of full batches ``((image, n), (digit, sum))`` over `MNISTAdder`."""
  # Independent streams for the shuffle and the integers, both from `seed`.
  shuffle_seed, number_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  return torch.utils.data.DataLoader(
      MNISTAdder(images_u8, labels, seed=number_seed),
      batch_size=batch_size,
      shuffle=shuffle,
      drop_last=True,
      num_workers=num_workers,
      worker_init_fn=seed_worker,
      generator=torch.Generator().manual_seed(shuffle_seed),
      persistent_workers=False,
  )


def consistency_loss(digit_logits, sum_logits, numbers) -> torch.Tensor:
  """The heads' disagreement through sum = digit + number (`adder.losses.consistency_loss`).

  batchmean KL(sum head's ten possible sums, renormalised || digit head)
  + KL(digit head moved up by the number || sum head's ten possible sums),
  each target detached.
  """
  possible = numbers[:, None] + torch.arange(10, device=numbers.device)
  log_digit = F.log_softmax(digit_logits, 1)
  log_sum = F.log_softmax(sum_logits, 1).gather(1, possible)
  log_sum_as_digit = F.log_softmax(sum_logits.gather(1, possible), 1)
  to_digit = F.kl_div(log_digit, log_sum_as_digit.detach(), reduction="batchmean",
                      log_target=True)
  to_sum = F.kl_div(log_sum, log_digit.detach(), reduction="batchmean", log_target=True)
  return to_digit + to_sum


def loss_fn(digit_logits, sum_logits, digits, sums, consistency_weight: float = 0.0
            ) -> torch.Tensor:
  """Mean cross-entropy of the digit head plus that of the sum head, plus the
  weighted `consistency_loss` (`Config.consistency_weight`)."""
  loss = F.cross_entropy(digit_logits, digits) + F.cross_entropy(sum_logits, sums)
  if consistency_weight:
    loss = loss + consistency_weight * consistency_loss(digit_logits, sum_logits, sums - digits)
  return loss


@dataclasses.dataclass
class TorchRun:
  """What one PyTorch training run mutates: model, optimizer, schedule, average."""

  model: TorchAdderNet
  optimizer: torch.optim.SGD
  scheduler: OneCycleLR
  swa_model: Optional[AveragedModel]
  swa_start: int  # index of the first optimizer step averaged
  swa_lr: Optional[float]  # the averaged steps' constant learning rate; None: OneCycleLR's
  swa_momentum: float  # and their momentum (OneCycleLR's final)
  total_steps: int
  device: torch.device
  consistency_weight: float = 0.0  # of the loss's consistency term
  step: int = 0  # optimizer steps taken
  last_lr: float = float("nan")  # learning rate of the last step taken


def create_run(
    config: Config,
    steps_per_epoch: int,
    *,
    device: str | torch.device = "cpu",
    state_dict: Optional[dict[str, Any]] = None,
    dtype: torch.dtype = torch.float32,
) -> TorchRun:
  """A fresh run: weights from ``config.seed`` (PyTorch's init) or `state_dict`.

  Args:
    state_dict: e.g. ``adder.convert.flax_to_torch_state_dict(variables)``;
      numpy arrays are accepted.
    dtype: of the parameters (float64 for the parity tests' exact runs); the
      inputs given to `train_step` must have it too.
  """
  if config.augment:
    raise ValueError("the PyTorch reference trains on the images as they are: pass "
                     "config.without_augmentation()")
  device = torch.device(device)
  torch.manual_seed(config.seed)
  model = TorchAdderNet(config)
  if state_dict is not None:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state_dict.items()})
  model.to(device=device, dtype=dtype)
  total_steps = config.epochs * steps_per_epoch
  swa_start = optim_lib.swa_start_step(config, total_steps)
  swa_lr = config.swa_lr if config.swa else None
  optimizer = torch.optim.SGD(
      model.parameters(), lr=config.lr, momentum=config.max_momentum,
      weight_decay=config.weight_decay, nesterov=config.nesterov)
  scheduler = OneCycleLR(
      optimizer, max_lr=config.lr, total_steps=total_steps if swa_lr is None else swa_start,
      pct_start=config.pct_start,
      anneal_strategy="cos", cycle_momentum=True, base_momentum=config.base_momentum,
      max_momentum=config.max_momentum, div_factor=config.div_factor,
      final_div_factor=config.final_div_factor)
  return TorchRun(
      model=model, optimizer=optimizer, scheduler=scheduler,
      swa_model=AveragedModel(model) if config.swa else None,
      swa_start=swa_start, swa_lr=swa_lr, swa_momentum=config.max_momentum,
      total_steps=total_steps, device=device, consistency_weight=config.consistency_weight)


def train_step(run: TorchRun, images: torch.Tensor, numbers: torch.Tensor,
               digits: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
  """One optimizer step (then the schedule, then the average); the loss, unsynced."""
  run.model.train()
  digit_logits, sum_logits = run.model((images, numbers))
  loss = loss_fn(digit_logits, sum_logits, digits, sums, run.consistency_weight)
  run.optimizer.zero_grad(set_to_none=True)
  loss.backward()
  run.last_lr = run.optimizer.param_groups[0]["lr"]
  run.optimizer.step()
  if run.swa_lr is not None and run.step + 1 >= run.swa_start:
    for group in run.optimizer.param_groups:  # the next step averages: constant rate
      group["lr"], group["momentum"] = run.swa_lr, run.swa_momentum
  else:
    run.scheduler.step()
  if run.swa_model is not None and run.step >= run.swa_start:
    run.swa_model.update_parameters(run.model)
  run.step += 1
  return loss.detach()


def train_epoch_in_memory(
    run: TorchRun,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
  """One epoch over tensors already on the device; the mean loss.

  Args:
    images: float32 (N, 1, 28, 28), normalised (`normalize_images`).
    labels: int64 (N,). Both on ``run.device``.
    generator: CPU generator drawing the permutation and the integers.
  """
  n = labels.shape[0]
  steps = n // batch_size
  perm = torch.randperm(n, generator=generator)[: steps * batch_size]
  perm = perm.view(steps, batch_size).to(run.device)
  numbers = torch.randint(NUM_DIGITS, (steps, batch_size), generator=generator).to(run.device)
  losses = []
  for k in range(steps):
    idx, nums = perm[k], numbers[k]
    digits = labels[idx]
    losses.append(train_step(run, images[idx], nums, digits, digits + nums))
  return float(torch.stack(losses).mean())


def _on_device(batches: Iterable, device: torch.device) -> Iterator:
  for (images, numbers), (digits, sums) in batches:
    yield ((images.to(device, non_blocking=True), numbers.to(device, non_blocking=True)),
           (digits.to(device, non_blocking=True), sums.to(device, non_blocking=True)))


def train_epoch_dataloader(run: TorchRun, loader: torch.utils.data.DataLoader) -> float:
  """One epoch over a `make_loader` DataLoader; the mean loss."""
  losses = [train_step(run, images, numbers, digits, sums)
            for (images, numbers), (digits, sums) in _on_device(loader, run.device)]
  return float(torch.stack(losses).mean())


def ordered_batches(images: torch.Tensor, batch_size: int) -> Iterator:
  """``update_bn`` input: the images in order, full batches, as ``((x, n), None)``."""
  zeros = torch.zeros(batch_size, dtype=torch.int64, device=images.device)
  for k in range(images.shape[0] // batch_size):
    yield (images[k * batch_size:(k + 1) * batch_size], zeros), None


def finish_swa(run: TorchRun, bn_batches: Iterable) -> Optional[TorchAdderNet]:
  """The averaged model with BatchNorm statistics recomputed by ``update_bn``.

  Args:
    bn_batches: ``((image, n), ...)`` batches on ``run.device``: the training
      set in order, full batches of the training batch size.

  Returns:
    The averaged `TorchAdderNet`, or None without averaging (or no step averaged).
  """
  if run.swa_model is None or int(run.swa_model.n_averaged) == 0:
    return None
  update_bn(bn_batches, run.swa_model)
  return run.swa_model.module


@torch.no_grad()
def predict(
    model: TorchAdderNet,
    images_u8: torch.Tensor,
    image_index: np.ndarray,
    numbers: np.ndarray,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Eval-mode (digit, sum) predictions, int (M,), for cases (image_index[m], numbers[m])."""
  model.eval()
  device = next(model.parameters()).device
  digits, sums = [], []
  for start in range(0, len(image_index), batch_size):
    idx = torch.tensor(image_index[start:start + batch_size], dtype=torch.int64)  # a copy
    nums = torch.tensor(numbers[start:start + batch_size], dtype=torch.int64)
    digit_logits, sum_logits = model(
        (normalize_images(images_u8[idx]).to(device), nums.to(device)))
    digits.append(digit_logits.argmax(1).cpu())
    sums.append(sum_logits.argmax(1).cpu())
  return torch.cat(digits).numpy(), torch.cat(sums).numpy()


def evaluate(
    model: TorchAdderNet,
    images_u8: np.ndarray,
    labels: np.ndarray,
    image_index: np.ndarray,
    numbers: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
  """`adder.metrics.compute_metrics` of `model` over fixed cases."""
  digit_pred, sum_pred = predict(
      model, torch.as_tensor(images_u8), image_index, numbers, batch_size)
  return metrics_lib.compute_metrics(digit_pred, sum_pred, labels[image_index], numbers)


def train(
    config: Config,
    workdir: Optional[str] = None,
    *,
    dataset: Optional[dict[str, np.ndarray]] = None,
    pipeline: str = "dataloader",
    num_workers: int = 0,
    device: Optional[str] = None,
    log: bool = True,
) -> dict[str, Any]:
  """Train `config` with PyTorch, evaluate like `adder.train`, write ``results.json``.

  Args:
    workdir: receives ``metrics.jsonl`` and ``results.json``; None writes nothing.
    dataset: as returned by `adder.data.load_mnist`; None loads MNIST.
    pipeline: ``"dataloader"`` (the original) or ``"inmemory"``.
    device: ``"cpu"``, ``"cuda"``...; None: CUDA if PyTorch sees it, else CPU.

  Returns:
    The results: ``final``/``swa`` -> ``test``/``exhaustive`` metrics, ``params``,
    ``backend``, ``devices``, ``train_seconds``, ``epoch_seconds`` (training
    only, evaluation excluded), ``wall_seconds`` (from the data in host memory
    to the final scores, as `adder.train`'s), ``config``, ``versions``.
  """
  if pipeline not in ("dataloader", "inmemory"):
    raise ValueError(f"unknown pipeline {pipeline!r}")
  device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
  if dataset is None:
    dataset = data_lib.load_mnist(config.mnist_dir, config.data_dir)
  train_x, train_y = dataset["train_images"], dataset["train_labels"]
  test_y = dataset["test_labels"]
  steps_per_epoch = len(train_y) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch size {config.batch_size} exceeds the {len(train_y)} images")

  t_start = time.perf_counter()
  run = create_run(config, steps_per_epoch, device=device)
  n_params = sum(p.numel() for p in run.model.parameters())
  if log:
    print(f"PyTorch {torch.__version__} device={device} threads={torch.get_num_threads()} "
          f"pipeline={pipeline} workers={num_workers}; model: {n_params:,} parameters; "
          f"{steps_per_epoch} steps/epoch of {config.batch_size}", flush=True)
  run_epoch, bn_batches = _pipeline(run, config, train_x, train_y, pipeline, num_workers,
                                    device)
  test = (dataset["test_images"], test_y, np.arange(len(test_y), dtype=np.int32),
          data_lib.test_numbers(len(test_y), config.eval_seed))
  history, epoch_seconds = _train_epochs(run, run_epoch, config, test, log)

  models = {"final": run.model}
  swa_model = finish_swa(run, bn_batches())
  if swa_model is not None:
    models["swa"] = swa_model
  results: dict[str, Any] = _score(models, test, config.eval_batch_size, log)
  results.update(_run_info(config, device, n_params, epoch_seconds, t_start, pipeline,
                           num_workers))
  if workdir is not None:
    _write_run(workdir, history, results)
  return results


def _pipeline(run: TorchRun, config: Config, train_x: np.ndarray, train_y: np.ndarray,
              pipeline: str, num_workers: int,
              device: torch.device) -> tuple[Callable[[], float], Callable[[], Iterable]]:
  """The pipeline's epoch (it returns the mean loss) and the SWA BatchNorm pass's batches.

  In memory, the training set moves to `device` now; a DataLoader is built now
  for the epochs and, in order, when the BatchNorm pass asks for its batches.
  """
  if pipeline == "inmemory":
    images = normalize_images(torch.as_tensor(train_x)).to(device)
    labels = torch.as_tensor(train_y, dtype=torch.int64).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    return (lambda: train_epoch_in_memory(run, images, labels, config.batch_size, generator),
            lambda: ordered_batches(images, config.batch_size))
  loader = make_loader(train_x, train_y, config.batch_size, seed=config.seed,
                       num_workers=num_workers)
  return (lambda: train_epoch_dataloader(run, loader),
          lambda: _on_device(make_loader(
              train_x, train_y, config.batch_size, seed=config.seed, shuffle=False,
              num_workers=num_workers), device))


def _train_epochs(run: TorchRun, run_epoch: Callable[[], float], config: Config, test: tuple,
                  log: bool) -> tuple[list[dict[str, Any]], list[float]]:
  """`config.epochs` epochs, each scored on the test pairs: (the metrics rows, the epochs' seconds).

  Args:
    test: (images, labels, image index, numbers) of the test pairs.
  """
  history, epoch_seconds = [], []
  for epoch in range(1, config.epochs + 1):
    t0 = time.perf_counter()
    loss = run_epoch()  # ends with a host sync (the mean loss)
    seconds = time.perf_counter() - t0
    epoch_seconds.append(seconds)
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss became {loss} in epoch {epoch}; lower --lr")
    scores = evaluate(run.model, *test, config.eval_batch_size)
    row = {"epoch": epoch, "train_loss": loss, **{f"test_{k}": v for k, v in scores.items()},
           "lr": run.last_lr, "seconds": seconds}
    history.append(row)
    if log:
      print(f"epoch {epoch:2d}/{config.epochs}  loss {loss:.4f}  test digit "
            f"{row['test_digit_acc']:.4f} sum {row['test_sum_acc']:.4f} joint "
            f"{row['test_joint_acc']:.4f}  lr {row['lr']:.5f}  {seconds:.1f}s", flush=True)
  return history, epoch_seconds


def _score(models: dict[str, TorchAdderNet], test: tuple, batch_size: int,
           log: bool) -> dict[str, Any]:
  """Each model's ``test`` (the fixed pairs) and ``exhaustive`` metrics, by name."""
  test_x, test_y = test[:2]
  ex_index, ex_nums = data_lib.exhaustive_pairs(len(test_y))
  results: dict[str, Any] = {}
  for name, model in models.items():
    results[name] = {
        "test": evaluate(model, *test, batch_size),
        "exhaustive": evaluate(model, test_x, test_y, ex_index, ex_nums, batch_size),
    }
    if log:
      test_m, ex = results[name]["test"], results[name]["exhaustive"]
      print(f"{name:5s}  test joint {test_m['joint_acc']:.4f}  exhaustive: digit "
            f"{ex['digit_acc']:.4f} sum {ex['sum_acc']:.4f} joint {ex['joint_acc']:.4f} "
            f"consistency {ex['consistency']:.4f}", flush=True)
  return results


def _run_info(config: Config, device: torch.device, n_params: int, epoch_seconds: list[float],
              t_start: float, pipeline: str, num_workers: int) -> dict[str, Any]:
  """The results' keys besides the scores; ``wall_seconds`` runs from `t_start` to now."""
  return {
      "params": n_params,
      "backend": device.type,
      "devices": 1,
      "device_kind": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else platform.processor() or platform.machine()),
      "train_seconds": sum(epoch_seconds),
      "wall_seconds": time.perf_counter() - t_start,
      "epoch_seconds": epoch_seconds,
      "pipeline": pipeline,
      "num_workers": num_workers,
      "threads": torch.get_num_threads(),
      "config": config.to_dict(),
      "versions": {"torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
  }


def _write_run(workdir: str, history: list[dict[str, Any]], results: dict[str, Any]) -> None:
  """``metrics.jsonl`` (a row per epoch) and ``results.json`` in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in history)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)


def create_parser() -> argparse.ArgumentParser:
  """The reference's parser: `adder.config.REFERENCE_FLAGS`, as adder.train defines them."""
  p = argparse.ArgumentParser(
      prog="python experiments/torch_reference.py",
      description="Train the MNIST adder with the original PyTorch recipe and evaluate "
                  "it like adder.train (same fixed pairs, same results.json keys).")
  p.add_argument("--workdir", default="runs/torch_reference",
                 help="receives metrics.jsonl and results.json (default: %(default)s)")
  config_lib.add_flags(p, config_lib.REFERENCE_FLAGS)
  p.add_argument("--pipeline", choices=("dataloader", "inmemory"), default="dataloader",
                 help="dataloader: the original Dataset + DataLoader; inmemory: the "
                      "training set as one tensor, batches by indexing (default: %(default)s)")
  p.add_argument("--num-workers", type=int, default=0,
                 help="DataLoader worker processes (dataloader pipeline; default: %(default)s)")
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: PyTorch's choice)")
  p.add_argument("--device", default=None,
                 help="cpu, cuda, ... (default: cuda if PyTorch sees it, else cpu)")
  return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
  """Flags -> (Config, the remaining options). Unset flags keep `Config`'s defaults.

  Raises:
    ValueError: a field out of its range (`Config.validate`).
  """
  p = create_parser()
  a = p.parse_args(argv)
  if a.num_workers < 0:
    p.error("--num-workers must be at least 0")
  if a.threads is not None and a.threads < 1:
    p.error("--threads must be at least 1")
  # The original recipe has no augmentation, and neither has this reference.
  # --consistency-weight 0 gives the original's loss too.
  return config_lib.from_flags(a).without_augmentation().validate(), a


def main(argv: Optional[list[str]] = None) -> int:
  try:
    config, a = parse_args(argv)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.threads is not None:
    torch.set_num_threads(a.threads)
  try:
    train(config, a.workdir, pipeline=a.pipeline, num_workers=a.num_workers, device=a.device)
  except (data_lib.DataError, FloatingPointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
