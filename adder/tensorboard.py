"""TensorBoard event files of a training run, written with tensorboardX (no TensorFlow).

`EventLog` writes into ``<workdir>/tensorboard/``, on the host after each
epoch (never inside jitted code), from what `adder.train.run_epoch` already
brought back:

* ``epoch/<name>`` for every number of the epoch's metrics row, the figures of
  ``metrics.jsonl``: ``train_loss``, ``test_loss``, ``test_digit_acc``,
  ``test_sum_acc``, ``test_joint_acc``, ``test_consistency``, ``lr``,
  ``seconds``;
* ``step/loss``, each step's training loss (train mode, before its update);
* ``step/lr``, each step's learning rate, from the schedule.

Every point's x is the training step: updates applied, as ``TrainState.step``
counts them. Update ``k`` (0-based) writes its loss and learning rate at step
``k + 1``; epoch ``e``'s row is at ``e * steps_per_epoch``, where its last
update ends. One axis for every tag lines the per-step and per-epoch curves
up, and lets one purge step cover both.

Resuming: a session that resumes after epoch ``e`` starts its event file with
tensorboardX's ``purge_step`` ``e * steps_per_epoch + 1`` (a
``SessionLog.START`` record), and TensorBoard drops the points at that step
and after from the files before it: those of epochs that ran but were not
saved, so that each step shows once, as ``metrics.jsonl`` holds each row once.
(TensorBoard's Rust loader skips that record but drops a tag's points from a
step on when an earlier step follows them, with the same result.) A session
that starts from scratch (a new workdir, ``--restart``) first deletes the
event files there, as it rewrites ``metrics.jsonl``. Each file's name ends in
its first step, so that files opened within the same second sort, and are
read, in the order they were written.
"""

from __future__ import annotations

import glob
import numbers
import os
import sys
from typing import Any

import numpy as np
import optax

SUBDIR = "tensorboard"  # in the workdir
FLUSH_SECS = 10  # longest wait before a written point reaches the file
EVENT_FILES = "events.out.tfevents.*"


def _summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported without importing PyTorch.

  tensorboardX only probes for ``torch`` (to accept its tensors) but imports it
  whole when installed, which takes seconds; marking it absent while
  tensorboardX loads spares that. Where torch is already loaded it is used.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def clear_events(logdir: str) -> list[str]:
  """Delete the event files in `logdir` (nothing else); returns their paths."""
  paths = sorted(glob.glob(os.path.join(logdir, EVENT_FILES)))
  for path in paths:
    os.remove(path)
  return paths


class EventLog:
  """The event file of one training session (see the module docstring).

  Args:
    logdir: the folder of the event files, ``<workdir>/tensorboard``.
    lr_fn: the learning-rate schedule of the 0-based update count; it takes
      an array of counts.
    steps_per_epoch: updates per epoch.
    epochs_done: epochs already trained (and saved) before this session; 0
      deletes the event files in `logdir`.

  The file is opened by the first `write_epoch`, so a session with no epoch
  left to train writes none. Close it with `close`.
  """

  def __init__(
      self, logdir: str, lr_fn: optax.Schedule, steps_per_epoch: int, epochs_done: int
  ) -> None:
    self.logdir = logdir
    self.lr_fn = lr_fn
    self.steps_per_epoch = steps_per_epoch
    self.first_step = epochs_done * steps_per_epoch + 1
    self._writer: Any = None
    if epochs_done == 0:
      clear_events(logdir)

  def write_epoch(self, row: dict[str, Any], losses: np.ndarray) -> None:
    """Write epoch ``row["epoch"]``: its per-step losses and learning rates, then its row.

    Args:
      row: the metrics row (`adder.train.run_epoch`); every real number but
        ``epoch`` is written.
      losses: float (steps_per_epoch,), the epoch's training loss per step.
    """
    if self._writer is None:
      self._writer = _summary_writer_class()(
          self.logdir, purge_step=self.first_step, flush_secs=FLUSH_SECS,
          max_queue=2 * self.steps_per_epoch + 64,
          filename_suffix=f".step{self.first_step:09d}")
    end = row["epoch"] * self.steps_per_epoch
    updates = np.arange(end - len(losses), end)
    lrs = np.asarray(self.lr_fn(updates), np.float64)
    for k, loss, lr in zip(updates.tolist(), np.asarray(losses, np.float64).tolist(),
                           lrs.tolist()):
      self._writer.add_scalar("step/loss", loss, k + 1)
      self._writer.add_scalar("step/lr", lr, k + 1)
    for name, value in row.items():
      if name != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        self._writer.add_scalar(f"epoch/{name}", float(value), end)
    self._writer.flush()

  def close(self) -> None:
    """Write out what is pending and close the file (if one was opened)."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def event_log(workdir: str, lr_fn: optax.Schedule, steps_per_epoch: int,
              epochs_done: int) -> EventLog:
  """The `EventLog` of a training session in `workdir` (its ``tensorboard/`` folder)."""
  return EventLog(os.path.join(workdir, SUBDIR), lr_fn, steps_per_epoch, epochs_done)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """The scalars TensorBoard shows from the event files of `logdir`: ``{tag: [(step, value)]}``.

  Files are read in name order; a ``SessionLog.START`` record at step ``s``
  drops the points read so far at ``s`` and after, as TensorBoard's Python
  loader does (``purge_orphaned_data``). Each tag's points are in the order
  written. For tests and notebooks; needs neither TensorFlow nor TensorBoard.
  """
  _summary_writer_class()  # tensorboardX's protos, without PyTorch
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, EVENT_FILES))):
    for record in _records(path):
      event = event_pb2.Event.FromString(record)
      if (event.HasField("session_log")
          and event.session_log.status == event_pb2.SessionLog.START):
        scalars = {tag: [(s, v) for s, v in points if s < event.step]
                   for tag, points in scalars.items()}
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _records(path: str) -> list[bytes]:
  """The records of a TFRecord file (length, its CRC, data, its CRC); CRCs unchecked."""
  records = []
  with open(path, "rb") as f:
    while header := f.read(12):
      length = int.from_bytes(header[:8], "little")
      records.append(f.read(length))
      f.read(4)
  return records
