"""TensorBoard event files: steps, tags, the purge of a resumed session, a fresh start."""

import os
import subprocess
import sys

import numpy as np
import pytest

from adder import tensorboard

STEPS_PER_EPOCH = 4


def _lr(updates):
  return 0.5 ** np.asarray(updates, np.float64)  # any schedule of the update count


def _row(epoch, offset=0.0):
  return {"epoch": epoch, "train_loss": 1.0 / epoch + offset, "test_joint_acc": 0.5 + offset,
          "lr": float(_lr(epoch * STEPS_PER_EPOCH - 1)), "seconds": 2.0, "note": "text"}


def _losses(epoch, offset=0.0):
  return np.arange(STEPS_PER_EPOCH, dtype=np.float32) + 10 * epoch + offset


def _session(logdir, epochs_done, epochs, offset=0.0):
  log = tensorboard.EventLog(logdir, _lr, STEPS_PER_EPOCH, epochs_done)
  for epoch in epochs:
    log.write_epoch(_row(epoch, offset), _losses(epoch, offset))
  log.close()


def test_steps_tags_and_values(tmp_path):
  logdir = str(tmp_path / "tb")
  _session(logdir, 0, [1, 2])
  got = tensorboard.read_scalars(logdir)
  assert set(got) == {"step/loss", "step/lr", "epoch/train_loss", "epoch/test_joint_acc",
                      "epoch/lr", "epoch/seconds"}  # numbers only, "epoch" itself left out
  assert got["step/lr"] == [(k + 1, pytest.approx(0.5 ** k)) for k in range(8)]
  assert got["step/loss"] == [(k + 1, v) for k, v in
                              enumerate(np.concatenate([_losses(1), _losses(2)]).tolist())]
  assert got["epoch/train_loss"] == [(4, 1.0), (8, 0.5)]  # where each epoch's updates end
  assert got["epoch/lr"] == [(s, v) for s, v in got["step/lr"] if s in (4, 8)]


def test_a_resumed_session_hides_the_unsaved_epochs(tmp_path):
  logdir = str(tmp_path / "tb")
  _session(logdir, 0, [1, 2, 3])  # epochs 2 and 3 logged, only epoch 1 saved
  _session(logdir, 1, [2, 3], offset=100.0)  # resumed after epoch 1, in the same second
  files = sorted(os.listdir(logdir))
  assert [f.rsplit(".", 1)[1] for f in files] == ["step000000001", "step000000005"]
  got = tensorboard.read_scalars(logdir)
  assert [s for s, _ in got["step/loss"]] == list(range(1, 13))  # each step once
  expected = np.concatenate([_losses(1), _losses(2, 100.0), _losses(3, 100.0)])
  np.testing.assert_array_equal([v for _, v in got["step/loss"]], expected)
  assert got["epoch/test_joint_acc"] == [(4, 0.5), (8, 100.5), (12, 100.5)]


def test_a_fresh_session_deletes_the_old_events_and_an_idle_one_writes_none(tmp_path):
  logdir = tmp_path / "tb"
  _session(str(logdir), 0, [1])
  (logdir / "notes.txt").write_text("kept")
  _session(str(logdir), 1, [])  # nothing left to train: no file
  assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
  _session(str(logdir), 0, [])  # from scratch: the old run's events go
  assert os.listdir(logdir) == ["notes.txt"]


def test_pytorch_is_not_imported(tmp_path):
  code = ("import sys, numpy as np; from adder import tensorboard; "
          f"log = tensorboard.EventLog({str(tmp_path)!r}, lambda k: np.ones(len(k)), 2, 0); "
          "log.write_epoch({'epoch': 1, 'lr': 1.0}, np.ones(2)); log.close(); "
          "import tensorboardX; print('torch' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
