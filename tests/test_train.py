"""adder.train: the loop end to end on fake data: rows, results, artifacts, saving and
resuming, TensorBoard, and the experiment scripts that read its workdirs."""

import json
import math
import os
import sys

import chex
import jax
import numpy as np
import pytest

from adder import checkpoint
from adder import data as data_lib
from adder import optim
from adder import stopping
from adder import tensorboard
from adder import train as train_lib
from adder import workdir as workdir_lib
from adder.config import Config
from conftest import REPO, TINY, TINY_AUGMENTED, metrics_rows as _rows


def test_batch_stats_script_scores_the_plain_statistics_that_training_stored(
    short_run, short_run_augmented, fake_mnist):
  sys.path.insert(0, str(REPO / "experiments"))
  import batch_stats  # pylint: disable=g-import-not-at-top
  stored, plain, swa = batch_stats.COLUMNS
  for (workdir, results), recomputed in ((short_run, False), (short_run_augmented, True)):
    score = batch_stats.scores(workdir, fake_mnist)
    assert score[stored] == results["final"]["exhaustive"]["joint_acc"]
    assert score[swa] == results["swa"]["exhaustive"]["joint_acc"]
    if recomputed:  # after augmented training, training stored what the script recomputes
      assert score[plain] == score[stored]


def test_hard_images_script_misreads_what_training_scored(short_run, fake_mnist):
  sys.path.insert(0, str(REPO / "experiments"))
  import hard_images  # pylint: disable=g-import-not-at-top
  workdir, results = short_run
  num_images = len(fake_mnist["test_labels"])
  for weights in ("final", "swa"):
    readings = hard_images.digit_readings(workdir, fake_mnist, weights)
    chex.assert_shape(readings, (num_images, 10))
    misread = hard_images.misread(readings, fake_mnist["test_labels"])
    # Each misread image is wrong in 1 to 10 of its cases, the rest in none.
    wrong_cases = round((1 - results[weights]["exhaustive"]["digit_acc"]) * num_images * 10)
    assert math.ceil(wrong_cases / 10) <= misread.sum() <= wrong_cases
    assert wrong_cases > 0  # three tiny epochs leave some images misread


def test_short_run_loss_falls_and_learns(short_run):
  workdir, results = short_run
  rows = _rows(workdir)
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  # Falls every epoch (by 12% over the three with the consistency term, which
  # rises while the heads grow confident; the accuracy below shows learning).
  assert rows[2]["train_loss"] < rows[1]["train_loss"] < rows[0]["train_loss"]
  # Ten fixed blob patterns: far better than chance (0.1) after three epochs.
  assert results["final"]["test"]["digit_acc"] > 0.5
  # The last row scored the last iterate, as results.json's "final" does.
  assert rows[-1]["test_loss"] == pytest.approx(results["final"]["test"]["loss"], rel=1e-6)
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_results_json_keys(short_run):
  workdir, results = short_run
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk == json.loads(json.dumps(results))
  for weights in ("final", "swa"):
    for split in ("test", "exhaustive"):
      for key in ("digit_acc", "sum_acc", "joint_acc"):
        assert 0.0 <= on_disk[weights][split][key] <= 1.0
    assert "consistency" in on_disk[weights]["exhaustive"]
  for key in ("params", "backend", "devices", "train_seconds", "config", "versions"):
    assert key in on_disk
  assert on_disk["params"] == 17_393 and on_disk["devices"] == jax.device_count()
  assert set(on_disk["versions"]) >= {"jax", "flax", "optax"}
  if jax.default_backend() == "cpu":  # which convolutions trained, adder's or XLA's
    assert on_disk["cpu_convolutions"].startswith("cpu convolutions: ")
  assert on_disk["config"]["batch_size"] == 32


def test_artifacts_and_checkpoint_predicts_like_training(short_run, fake_mnist):
  from adder import predict  # pylint: disable=g-import-not-at-top
  workdir, results = short_run
  for name in ("loss.png", "accuracy.png", "lr.png", "samples.png", "mistakes.png",
               "confusion.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  predictor = predict.load(workdir)  # the averaged weights, as evaluated
  images = fake_mnist["test_images"]
  numbers = data_lib.test_numbers(len(images), TINY.eval_seed)
  digits, sums = predictor(images, numbers)
  labels = fake_mnist["test_labels"]
  joint = float(np.mean((digits == labels) & (sums == labels + numbers)))
  assert joint == pytest.approx(results["swa"]["test"]["joint_acc"])


def test_no_swa_has_no_averaged_results(fake_mnist, tmp_path):
  config = TINY.replace(epochs=1, swa=False)
  results = train_lib.train_and_evaluate(config, str(tmp_path), dataset=fake_mnist,
                                         write_artifacts=False)
  assert "swa" not in results and "final" in results


def test_one_epoch_on_real_mnist(prepared_mnist, tmp_path):
  config = Config(epochs=1, data_dir=prepared_mnist)
  results = train_lib.train_and_evaluate(config, str(tmp_path / "run"), write_artifacts=False)
  assert results["final"]["test"]["digit_acc"] >= 0.97
  assert results["final"]["exhaustive"]["joint_acc"] >= 0.95



# --- resuming ----------------------------------------------------------------------


def _stop_after(monkeypatch, last_epoch, signal_exception=KeyboardInterrupt):
  """Make `run_epoch` raise `signal_exception` when epoch ``last_epoch + 1`` starts."""
  run_epoch = train_lib.run_epoch

  def stopping(s, state, epoch, test_pairs):
    if epoch > last_epoch:
      raise signal_exception()
    return run_epoch(s, state, epoch, test_pairs)

  monkeypatch.setattr(train_lib, "run_epoch", stopping)


def _flat(scores):
  """Scores with each list (``joint_acc_by_number``) spread into one entry per item."""
  out = {}
  for k, v in scores.items():
    out.update({f"{k}[{i}]": x for i, x in enumerate(v)} if isinstance(v, list) else {k: v})
  return out


def _without_seconds(rows):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _assert_same_run(workdir, results, reference_dir, reference_results):
  """Same metrics rows (but for the time), scores and weights as the reference run."""
  got, want = _without_seconds(_rows(workdir)), _without_seconds(_rows(reference_dir))
  assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
  for g, w in zip(got, want):
    assert g == pytest.approx(w, rel=1e-6, abs=1e-7)
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  for weights in ("final", "swa"):
    for split in ("test", "exhaustive"):
      want = pytest.approx(_flat(reference_results[weights][split]), rel=1e-6, abs=1e-7)
      assert _flat(results[weights][split]) == want
      assert _flat(on_disk[weights][split]) == want
  _, weights = checkpoint.load(workdir)
  _, reference_weights = checkpoint.load(reference_dir)
  chex.assert_trees_all_close(weights, reference_weights, atol=1e-6, rtol=0)


# TINY: 8 steps per epoch, 24 in all; SWA averages from step 12, in epoch 2. Stopping
# after epoch 1 resumes before any averaging; after epoch 2, with the average half made
# (augmented, so that the resumed epoch must draw the transforms it would have drawn).
@pytest.mark.parametrize("saved_epochs, reference", [(1, "short_run"), (2, "short_run_augmented")],
                         ids=["before-swa", "during-swa-augmented"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    request, fake_mnist, tmp_path, monkeypatch, capsys, saved_epochs, reference):
  config = TINY if reference == "short_run" else TINY_AUGMENTED
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    _stop_after(m, saved_epochs)
    with pytest.raises(KeyboardInterrupt,
                       match=rf"in epoch {saved_epochs + 1}/3; epoch {saved_epochs} is saved"):
      train_lib.train_and_evaluate(config, workdir, dataset=fake_mnist)
  assert [r["epoch"] for r in _rows(workdir)] == list(range(1, saved_epochs + 1))
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  capsys.readouterr()

  results = train_lib.train_and_evaluate(config, workdir, dataset=fake_mnist)
  out = capsys.readouterr().out
  assert f"resuming after epoch {saved_epochs}/3" in out
  assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == [
      f"{e}/3" for e in range(saved_epochs + 1, 4)]  # only the epochs left ran
  reference_dir, reference_results = request.getfixturevalue(reference)
  _assert_same_run(workdir, results, reference_dir, reference_results)
  assert sorted(os.listdir(os.path.join(workdir, "state"))) == ["2", "3"]  # the last two



def test_a_stop_request_finishes_the_epoch_saves_it_and_the_rerun_ends_the_same(
    short_run, fake_mnist, tmp_path, monkeypatch, capsys):
  # No save is due before the last epoch: only the stop request makes one.
  config = TINY.replace(save_every_s=1e9)
  workdir = str(tmp_path / "run")
  stop = stopping.StopRequest()
  run_epoch = train_lib.run_epoch

  def signalled_in_epoch_2(s, state, epoch, pairs):
    if epoch == 2:
      stop.signum = stopping.signal.SIGINT  # as the handler records it
    return run_epoch(s, state, epoch, pairs)

  with monkeypatch.context() as m:
    m.setattr(train_lib, "run_epoch", signalled_in_epoch_2)
    with pytest.raises(stopping.Stopped, match=r"after epoch 2/3; epoch 2 is saved") as e:
      train_lib.train_and_evaluate(config, workdir, dataset=fake_mnist, stop=stop)
  assert e.value.status == 130
  assert os.listdir(os.path.join(workdir, "state")) == ["2"]
  assert [r["epoch"] for r in _rows(workdir)] == [1, 2]
  capsys.readouterr()
  results = train_lib.train_and_evaluate(config, workdir, dataset=fake_mnist)
  assert "resuming after epoch 2/3" in capsys.readouterr().out
  _assert_same_run(workdir, results, *short_run)


def _scalars(workdir):
  return tensorboard.read_scalars(os.path.join(workdir, tensorboard.SUBDIR))


def test_tensorboard_events_of_a_short_run(short_run):
  workdir, _ = short_run
  scalars, rows = _scalars(workdir), _rows(workdir)
  steps = 3 * 8  # TINY: 3 epochs of 8 steps
  assert [k for k, _ in scalars["step/lr"]] == list(range(1, steps + 1))  # one per step
  assert [k for k, _ in scalars["step/loss"]] == list(range(1, steps + 1))
  _, lr_fn = optim.create_optimizer(TINY, 8)
  np.testing.assert_allclose([v for _, v in scalars["step/lr"]], lr_fn(np.arange(steps)),
                             rtol=1e-6)
  names = [k for k in rows[0] if k != "epoch"]  # every figure of the metrics row
  assert {"train_loss", "test_loss", "test_digit_acc", "test_sum_acc", "test_joint_acc",
          "lr", "seconds"} <= set(names)
  for name in names:
    assert scalars[f"epoch/{name}"] == [(8 * r["epoch"], pytest.approx(r[name], rel=1e-6))
                                        for r in rows], name
  per_step = np.reshape([v for _, v in scalars["step/loss"]], (3, 8))
  np.testing.assert_allclose(per_step.mean(1), [r["train_loss"] for r in rows], rtol=1e-5)


def test_resumed_run_shows_each_step_once_in_tensorboard(
    short_run, fake_mnist, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  save_state = workdir_lib.save_state
  with monkeypatch.context() as m:
    # Epoch 2 is trained and logged but not saved; the run stops as epoch 3 starts.
    m.setattr(workdir_lib, "save_state", lambda states, epoch, *rest: None if epoch == 2
              else save_state(states, epoch, *rest))
    _stop_after(m, 2)
    with pytest.raises(KeyboardInterrupt, match="epoch 1 is saved"):
      train_lib.train_and_evaluate(TINY, workdir, dataset=fake_mnist, write_artifacts=False)
  assert [k for k, _ in _scalars(workdir)["step/loss"]] == list(range(1, 17))
  train_lib.train_and_evaluate(TINY, workdir, dataset=fake_mnist, write_artifacts=False)
  # Two files; the second purges from step 9 (after epoch 1) and rewrites epochs 2-3.
  assert len(os.listdir(os.path.join(workdir, tensorboard.SUBDIR))) == 2
  got, want = _scalars(workdir), _scalars(short_run[0])
  assert set(got) == set(want)
  for tag in want:
    assert [k for k, _ in got[tag]] == [k for k, _ in want[tag]], tag  # each step once
    if tag != "epoch/seconds":
      np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]],
                                 rtol=1e-5, atol=1e-6, err_msg=tag)


def test_saves_wait_for_the_interval_but_the_last_epoch_is_always_saved(
    fake_mnist, tmp_path):
  workdir = str(tmp_path / "run")
  rare = TINY.replace(save_every_s=1e9)  # no epoch before the last is due a save
  train_lib.train_and_evaluate(rare, workdir, dataset=fake_mnist, write_artifacts=False)
  assert os.listdir(os.path.join(workdir, "state")) == ["3"]
  assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3]


def test_restart_starts_over(short_run, fake_mnist, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  other = TINY.replace(epochs=1)
  train_lib.train_and_evaluate(other, workdir, dataset=fake_mnist, write_artifacts=False)
  with pytest.raises(ValueError, match=r"another config \(epochs 1 there, 3 here\)"):
    train_lib.train_and_evaluate(TINY, workdir, dataset=fake_mnist)
  capsys.readouterr()
  results = train_lib.train_and_evaluate(TINY, workdir, dataset=fake_mnist, restart=True)
  assert "resuming" not in capsys.readouterr().out
  reference_dir, reference_results = short_run
  _assert_same_run(workdir, results, reference_dir, reference_results)
  with checkpoint.open_states(workdir) as states:
    assert checkpoint.latest_state_meta(states)["config"] == TINY.to_dict()
