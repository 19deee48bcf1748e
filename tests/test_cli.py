"""adder.cli: `python -m adder.train`'s flags, its one-line errors, and its signals."""

import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from adder import cli
from adder import train as train_lib
from adder.config import Config
from conftest import REPO, metrics_rows


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "adder.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})



@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs (--epochs) must be at least 1, got 0"),
    (["--lr", "-1"], "lr (--lr) must be more than 0, got -1.0"),
    (["--swa-lr", "0"], "swa_lr (--swa-lr) must be more than 0, got 0.0"),
    (["--consistency-weight", "-1"], "consistency_weight (--consistency-weight) must be at least 0"),
    (["--consistency-weight", "nan"], "consistency_weight (--consistency-weight) must be at least 0"),
    (["--save-every", "-1"], "save_every_s (--save-every) must be at least 0"),
    (["--augment-shift", "-1"], "augment_shift_px (--augment-shift) must be at least 0 and at most 14"),
    (["--augment-rotate", "200"], "augment_rotate_deg (--augment-rotate) must be at least 0 and at most 180"),
    (["--augment-scale", "0.6"], "augment_scale (--augment-scale) must be at least 0 and at most 0.5"),
])
def test_cli_rejects_bad_values_in_one_error_line(args, message):
  error = _one_error_line(_cli(*args))
  assert error == f"error: {message}" or error.startswith(f"error: {message},")


@pytest.mark.parametrize("args", [["--batch-size", "x"], ["--label-smoothing", "0.1"],
                                  ["--augment-elastic", "1"]])
def test_cli_rejects_malformed_and_removed_flags(args):
  r = _cli(*args)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert ("invalid int value" in r.stderr) or ("unrecognized arguments" in r.stderr)


def test_cli_recipe_flags_reach_the_config():
  config, _ = cli.parse_args(["--consistency-weight", "0.25", "--swa-lr", "0.01",
                              "--augment-rotate", "15", "--save-every", "0"])
  assert (config.consistency_weight, config.swa_lr) == (0.25, 0.01)
  assert (config.augment_rotate_deg, config.save_every_s) == (15.0, 0.0)
  assert cli.parse_args([])[0] == Config()
  assert not cli.parse_args(["--running-batch-stats"])[0].plain_batch_stats
  assert not cli.parse_args(["--no-swa"])[0].swa
  assert cli.parse_args(["--no-augment"])[0] == Config().without_augmentation()


def test_cli_missing_dataset_is_one_clear_line(tmp_path):
  r = _cli("--epochs", "1", "--mnist-dir", str(tmp_path / "nowhere"),
           "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "lacks train-images" in errors[0]


def test_cli_require_gpu_refuses_on_cpu(tmp_path):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: --require-gpu is satisfied here")
  r = _cli("--require-gpu", "--workdir", str(tmp_path))
  assert r.returncode != 0 and "no GPU" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_a_workdir_of_another_config(fake_mnist, tmp_path):
  workdir = str(tmp_path / "run")
  saved = Config(epochs=1, batch_size=32)
  train_lib.train_and_evaluate(saved, workdir, dataset=fake_mnist, write_artifacts=False)
  # Refused before any data is read: no MNIST is needed here.
  r = _cli("--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--workdir", workdir,
           "--data-dir", str(tmp_path / "nowhere"))
  assert r.returncode == 2 and "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr
  assert "lr 0.2 there, 0.1 here" in errors[0] and "--restart" in errors[0]
  assert "epochs" not in errors[0] and "data_dir" not in errors[0]
  assert os.listdir(os.path.join(workdir, "state")) == ["1"]  # left as it was



# `python -m adder.train` on fake data: the same CLI, with `adder.data.load_mnist`
# answering with 4,096 fake images (128 steps of 32 per epoch).
_FAKE_DATA_CLI = """
import sys
from conftest import make_fake_mnist
from adder import cli, data
data.load_mnist = lambda mnist_dir=None, data_dir=None: make_fake_mnist(num_train=4096)
sys.exit(cli.main(sys.argv[1:]))
"""


def _fake_data_cli_env():
  tests = os.path.dirname(os.path.abspath(__file__))
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (tests, str(REPO), os.environ.get("PYTHONPATH")) if p)}



def _fake_cli(workdir, *flags):
  """The fake-data CLI's command: 4 epochs, no periodic save before the last."""
  return [sys.executable, "-c", _FAKE_DATA_CLI, "--epochs", "4", "--batch-size", "32",
          "--lr", "0.05", "--save-every", "1e9", "--workdir", str(workdir), *flags]


def _start(args):
  return subprocess.Popen(args, cwd=REPO, env=_fake_data_cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_line(stream, prefix):
  for line in stream:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"no line starting with {prefix!r}")


def _finish(proc, timeout=120):
  try:
    return proc.communicate(timeout=timeout)
  finally:
    proc.kill()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The fake-data CLI's run from start to end: its workdir."""
  workdir = tmp_path_factory.mktemp("whole")
  r = subprocess.run(_fake_cli(workdir), cwd=REPO, env=_fake_data_cli_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  return workdir


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_first_signal_saves_the_epoch_in_progress_and_the_rerun_ends_the_same(
    tmp_path, uninterrupted, signum):
  # Signalled once epoch 1 is logged, inside the first --save-every window (nothing
  # saved yet): epoch 2, in progress, is finished, saved, and the run exits. (On a
  # loaded machine the signal may land only in epoch 3: that one is saved then.)
  proc = _start(_fake_cli(tmp_path / "run"))
  _wait_for_line(proc.stdout, "epoch  1/4")
  proc.send_signal(signum)
  _, stderr = _finish(proc)
  name = signal.Signals(signum).name
  assert proc.returncode == 128 + signum, stderr
  assert "Traceback" not in stderr
  stopped = [l for l in stderr.splitlines() if l.startswith(f"stopped by {name}")]
  saved = 2 if "after epoch 2/4" in stderr else 3
  assert stopped == [f"stopped by {name} after epoch {saved}/4; epoch {saved} is saved in "
                     f"{tmp_path / 'run' / 'state'}: run the same command again to resume"]
  assert os.listdir(tmp_path / "run" / "state") == [str(saved)]
  assert len(metrics_rows(tmp_path / "run")) == saved

  resumed = subprocess.run(_fake_cli(tmp_path / "run"), cwd=REPO, env=_fake_data_cli_env(),
                           capture_output=True, text=True, timeout=120)
  assert resumed.returncode == 0, resumed.stderr
  assert f"resuming after epoch {saved}/4" in resumed.stdout
  without_seconds = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
  assert without_seconds(metrics_rows(tmp_path / "run")) == without_seconds(
      metrics_rows(uninterrupted))
  got, want = (json.load(open(d / "results.json")) for d in (tmp_path / "run", uninterrupted))
  for weights in ("final", "swa"):
    assert got[weights] == want[weights]


def test_cli_second_sigint_stops_at_once(tmp_path):
  proc = _start(_fake_cli(tmp_path / "run", "--epochs", "50"))
  _wait_for_line(proc.stdout, "cpu")  # the first line: still setting up
  proc.send_signal(signal.SIGINT)
  # The handler has run (while the run was still setting up, or between epochs).
  _wait_for_line(proc.stderr, "SIGINT: stopping after the epoch in progress")
  proc.send_signal(signal.SIGINT)
  _, stderr = _finish(proc, timeout=30)
  assert proc.returncode == -signal.SIGINT, stderr  # killed by the signal, not exited
  assert "Traceback" not in stderr
  rows = tmp_path / "run" / "metrics.jsonl"  # absent if it died before training
  assert not rows.exists() or len(metrics_rows(tmp_path / "run")) < 50


# --- bad input -------------------------------------------------------------------


def _one_error_line(r):
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr
  return errors[0]


def test_cli_refuses_a_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a folder")
  error = _one_error_line(_cli("--workdir", str(path)))
  assert f"--workdir {path} is a file" in error


def test_cli_batch_larger_than_the_training_set(tmp_path):
  # Refused before MNIST is read: no data is needed here.
  error = _one_error_line(_cli("--batch-size", "70000", "--workdir", str(tmp_path / "w"),
                               "--data-dir", str(tmp_path / "nowhere")))
  assert "batch size 70000 exceeds the 60000 training images" in error
