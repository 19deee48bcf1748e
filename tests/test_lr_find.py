"""The learning-rate range test: schedule, smoothing, divergence, suggestion, the CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from adder import data as data_lib
from adder import lr_find
from adder import distributed
from adder import train as train_lib
from adder.config import Config
from conftest import REPO

SMALL = Config(batch_size=32)  # the default recipe, 8 steps per epoch of the fake data


def test_exponential_schedule_closed_form():
  lr_fn = lr_find.exponential_schedule(1e-3, 10.0, 5)
  np.testing.assert_allclose(np.asarray(lr_fn(np.arange(5))), [1e-3, 1e-2, 1e-1, 1.0, 10.0],
                             rtol=1e-6)
  np.testing.assert_allclose(float(lr_fn(2)), 0.1, rtol=1e-6)  # a scalar step too
  for bad in ((0.0, 1.0, 5), (1.0, 1.0, 5), (1.0, math.inf, 5), (1e-3, 1.0, 1)):
    with pytest.raises(ValueError):
      lr_find.exponential_schedule(*bad)


def test_smoothing_is_a_bias_corrected_moving_average():
  # beta 0.5: averages 0.5, 1.25, 2.125 over weights 0.5, 0.75, 0.875.
  np.testing.assert_allclose(lr_find.smooth(np.array([1.0, 2.0, 3.0]), beta=0.5),
                             [1.0, 5 / 3, 17 / 7], rtol=1e-12)
  # Corrected, a constant stays itself from the first step (no pull towards 0).
  np.testing.assert_allclose(lr_find.smooth(np.full(50, 2.5)), 2.5, rtol=1e-12)
  assert np.isnan(lr_find.smooth(np.array([1.0, np.nan, 1.0]))[1:]).all()


@pytest.mark.parametrize("curve, expected", [
    ([5.0, 4.0, 3.0, 2.0, 1.0, 3.9, 4.1, 1.0], 6),  # 4.1 > 4 x the best so far (1.0)
    ([5.0, 4.0, 3.0, 2.0, 1.0, 4.0, 3.0], None),  # 4.0 is not more than 4 x 1.0
    ([1.0, 30.0], 1),  # the second point is already compared with the first
    ([100.0, 1.0], None),  # the first is never a divergence: it sets the best
    ([3.0, 2.0, np.nan, 1.0], 2),  # not finite: diverged
    ([np.inf, 1.0], 0),
])
def test_divergence_index(curve, expected):
  assert lr_find.divergence_index(np.array(curve)) == expected


def _synthetic_curve():
  """An exponential sweep 1e-5..10 (0.02 decades a step) whose loss falls fastest at 1e-2."""
  lrs = np.logspace(-5, 1, 301)
  return lrs, 3.0 - np.tanh(2.0 * (np.log10(lrs) + 2.0))


def test_suggestion_is_the_steepest_descent_against_log_lr():
  lrs, loss = _synthetic_curve()
  index = lr_find.suggest(lrs, loss)
  assert index == 150 and lrs[index] == pytest.approx(1e-2)
  # Lightning 1.x's rule (np.gradient over the index) picks the same point.
  assert int(np.argmax(-np.gradient(loss[10:-1]))) + 10 == index


def test_suggestion_skips_the_ends_and_non_finite_points():
  lrs, loss = _synthetic_curve()
  steep_start = loss.copy()
  steep_start[:10] += np.linspace(50.0, 0.0, 10)  # a steeper drop, in the first ten points
  assert lr_find.suggest(lrs, steep_start) == 150
  steep_end = loss.copy()
  steep_end[-1] = -100.0  # the last point (where the curve was cut) is left out
  assert lr_find.suggest(lrs, steep_end) == 150
  holes = loss.copy()
  holes[[149, 151]] = np.nan  # gone from the gradient; the steepest is still 150
  assert lr_find.suggest(lrs, holes) == 150
  assert lr_find.suggest(lrs[:12], loss[:12]) is None  # one point between the skips


def test_training_plan_continues_into_the_next_epochs():
  key = jax.random.PRNGKey(7)
  indices, numbers, keys = lr_find.training_plan(key, 64, 16, 10, augment=False)
  assert indices.shape == (10, 16) and keys is None  # 4 steps per epoch: epochs 1-3
  for epoch in (1, 2, 3):
    plan = data_lib.epoch_plan(key, epoch, 64, 16)
    rows = slice(4 * (epoch - 1), min(4 * epoch, 10))
    np.testing.assert_array_equal(indices[rows], plan[0][:rows.stop - rows.start])
    np.testing.assert_array_equal(numbers[rows], plan[1][:rows.stop - rows.start])


def test_range_test_starts_where_training_starts(fake_mnist):
  steps = lr_find.MIN_STEPS
  lr_fn = lr_find.exponential_schedule(1e-4, 1.0, steps)
  losses = lr_find.run_range_test(SMALL, fake_mnist, lr_fn, steps)
  assert losses.shape == (steps,) and losses.dtype == np.float32
  # Same initialisation and first batch as training: the first loss (before any
  # update, so whatever the learning rate) is training's first.
  s, state = train_lib.setup(SMALL, fake_mnist)
  _, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, 1)
  assert losses[0] == pytest.approx(float(distributed.to_host(m["loss"])[0]), rel=1e-5)
  assert np.all(np.isfinite(losses))


def test_report_says_where_it_diverged_and_the_rule():
  lrs = np.logspace(-5, 1, 40, dtype=np.float32)
  smoothed = np.concatenate([np.linspace(5.0, 1.0, 30), [2.0, 9.0]])  # 9 > 4 x 1: index 31
  at = lr_find.divergence_index(smoothed)
  result = lr_find.RangeTest(lrs[:at + 1], smoothed[:at + 1].astype(np.float32),
                             smoothed[:at + 1], 40, at, lr_find.suggest(lrs[:at + 1],
                                                                        smoothed[:at + 1]))
  lines = lr_find.report(result, SMALL)
  assert lines[0].startswith("diverged at step 31") and "more than 4x the lowest" in lines[0]
  assert lines[1].startswith(f"suggested peak lr: {result.suggested_lr:.3g}")
  assert lines[2].startswith("rule: steepest descent of the smoothed loss against log(lr)")


# `python -m adder.lr_find` on fake data: `adder.data.load_mnist` answers with the
# 256 fake images of `make_fake_mnist`.
_FAKE_DATA_CLI = """
import sys
from conftest import make_fake_mnist
from adder import data, lr_find
data.load_mnist = lambda mnist_dir=None, data_dir=None: make_fake_mnist()
sys.exit(lr_find.main(sys.argv[1:]))
"""


def _cli(*args, fake_data=False):
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (tests, str(REPO), os.environ.get("PYTHONPATH")) if p)}
  command = ["-c", _FAKE_DATA_CLI] if fake_data else ["-m", "adder.lr_find"]
  return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_on_fake_data_writes_the_plot_and_the_curve(tmp_path):
  out = tmp_path / "lr"
  r = _cli("--steps", "20", "--batch-size", "32", "--max-lr", "1", "--out", str(out),
           fake_data=True)
  assert r.returncode == 0, r.stderr
  assert os.path.getsize(out / "lr_find.png") > 0
  saved = json.loads((out / "lr_find.json").read_text())
  curve = saved["curve"]
  kept = len(curve["lr"])
  assert len(curve["loss"]) == len(curve["smoothed"]) == kept <= 20 == saved["steps"]
  assert curve["lr"][0] == pytest.approx(1e-5, rel=1e-6)
  assert saved["rule"] == lr_find.RULE and saved["recipe_lr"] == Config().lr
  assert saved["config"]["batch_size"] == 32
  if saved["suggestion"] is None:
    assert "no suggestion" in r.stdout
  else:
    assert curve["lr"][saved["suggestion_step"]] == saved["suggestion"]
    assert f"suggested peak lr: {saved['suggestion']:.3g}" in r.stdout
  assert f"wrote {out / 'lr_find.png'} and {out / 'lr_find.json'}" in r.stdout


def test_cli_help_lists_the_flags():
  r = _cli("--help")
  assert r.returncode == 0
  for flag in ("--min-lr", "--max-lr", "--steps", "--batch-size", "--seed", "--out",
               "--mnist-dir", "--data-dir"):
    assert flag in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--min-lr", "0"], "--min-lr and --max-lr must satisfy 0 < min < max"),
    (["--min-lr", "1", "--max-lr", "0.5"], "--min-lr and --max-lr must satisfy"),
    (["--max-lr", "nan"], "--min-lr and --max-lr must satisfy"),
    (["--steps", "5"], f"--steps must be at least {lr_find.MIN_STEPS}"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be at least 1, got 0"),
])
def test_cli_rejects_bad_flags(args, message):
  r = _cli(*args)
  errors = [l for l in r.stderr.splitlines() if "error:" in l]
  assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr


def test_cli_out_that_is_a_file_is_one_error_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  r = _cli("--out", str(path), "--data-dir", str(tmp_path / "nowhere"))
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert errors == [f"error: --out {path} is a file, not a folder"], r.stderr
