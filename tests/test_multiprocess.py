"""Several processes on one machine: a run joined over 127.0.0.1, as several hosts join one.

Each process is a subprocess of its own (a process joins one run, once), with a
free local port for the coordinator. Every wait has a time limit, so that a
collective that never ends fails the test instead of hanging it; the limits
are generous, as the machine may be slow and busy.
"""

import gzip
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adder import checkpoint
from adder import distributed
from conftest import REPO, real_mnist_dir

TIMEOUT_S = 300  # for a whole run of two processes on fake data
REAL_MNIST_TIMEOUT_S = 600  # for an epoch of the real MNIST and its evaluation
TESTS = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cpu_devices: int) -> dict:
  """The environment of one process: `cpu_devices` CPU devices, nothing else of the user's."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS",
                      "JAX_CPU_COLLECTIVES_IMPLEMENTATION")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(cpu_devices),
             PYTHONPATH=os.pathsep.join(p for p in (TESTS, str(REPO), env.get("PYTHONPATH")) if p))
  return env


def _start(args: list, cpu_devices: int, log_dir, name: str) -> subprocess.Popen:
  """`python ARGS` in the background, its output in ``log_dir/name.out`` and ``.err``."""
  with open(log_dir / f"{name}.out", "w") as out, open(log_dir / f"{name}.err", "w") as err:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO,
                            env=_env(cpu_devices), stdout=out, stderr=err)


def _kill_all(procs: dict) -> None:
  for proc in procs.values():
    proc.kill()
    proc.wait()


def _wait_all(procs: dict, log_dir, timeout: float = TIMEOUT_S) -> dict:
  """Wait for every process (all killed past `timeout`); {name: (returncode, stdout, stderr)}."""
  deadline = time.monotonic() + timeout
  try:
    for proc in procs.values():
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    _kill_all(procs)
  out = {name: (proc.returncode, (log_dir / f"{name}.out").read_text(),
                (log_dir / f"{name}.err").read_text()) for name, proc in procs.items()}
  assert time.monotonic() < deadline, f"not finished within {timeout} s (a hung collective?): " + \
      "; ".join(f"{name}: {err[-1500:]}" for name, (_, _, err) in out.items())
  return out


# A few steps on tiny fake data, through `train_and_evaluate`: ARGS are the
# coordinator, the process count (1: no coordinator), the process id and the workdir.
_TRAIN = """
import sys
from conftest import make_fake_mnist
from adder import devices, distributed, train
from adder.config import Config

coordinator, workdir = sys.argv[1], sys.argv[4]
processes, process_id = int(sys.argv[2]), int(sys.argv[3])
config = Config(epochs=2, batch_size=32, lr=0.05, eval_batch_size=64, swa_start_frac=0.5)
if processes > 1:
  distributed.initialize_distributed(coordinator, processes, process_id)
devices.configure_cpu_devices(config.batch_size, processes=processes)
train.train_and_evaluate(config, workdir, dataset=make_fake_mnist())
"""


def test_two_processes_train_as_one_process_with_two_devices(tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  run, elsewhere, single = tmp_path / "run", tmp_path / "process1", tmp_path / "single"
  # Process 1 gets a workdir of its own, to show that it writes nothing: the
  # plain files come from process 0, and orbax writes from process 0.
  procs = {
      "p0": _start(["-c", _TRAIN, coordinator, 2, 0, run], 1, tmp_path, "p0"),
      "p1": _start(["-c", _TRAIN, coordinator, 2, 1, elsewhere], 1, tmp_path, "p1"),
      "single": _start(["-c", _TRAIN, "", 1, 0, single], 2, tmp_path, "single"),
  }
  out = _wait_all(procs, tmp_path)
  for name, (code, _, err) in out.items():
    assert code == 0, f"{name}: {err[-3000:]}"

  _, multi_weights = checkpoint.load(str(run))
  _, single_weights = checkpoint.load(str(single))
  assert sorted(multi_weights) == ["final", "swa"]
  for name in multi_weights:  # parameters and BatchNorm statistics
    for a, b in zip(jax.tree_util.tree_leaves(multi_weights[name]),
                    jax.tree_util.tree_leaves(single_weights[name])):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)

  assert not elsewhere.exists()
  assert {"metrics.jsonl", "results.json", "checkpoint", "state"} <= set(os.listdir(run))
  # Only process 0 prints (Gloo's own line on connecting aside).
  assert [l for l in out["p1"][1].splitlines() if not l.startswith("[Gloo]")] == []
  results = json.loads((run / "results.json").read_text())
  assert (results["processes"], results["devices"], results["local_devices"]) == (2, 2, 1)
  assert [json.loads(row)["epoch"] for row in (run / "metrics.jsonl").read_text().splitlines()] \
      == [1, 2]


def _mnist_test_set(count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` official test images, uint8 (count, 28, 28), and their labels."""
  folder = real_mnist_dir()
  with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
  with gzip.open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  return images[:count], labels[:count].astype(np.int32)


def test_cli_two_processes_on_real_mnist(prepared_mnist, tmp_path):
  from adder import predict  # pylint: disable=g-import-not-at-top
  coordinator = f"127.0.0.1:{_free_port()}"
  run = tmp_path / "run"
  procs = {f"p{i}": _start(
      ["-m", "adder.train", "--epochs", "1", "--batch-size", "256", "--no-swa",
       "--data-dir", prepared_mnist, "--workdir", run, "--coordinator", coordinator,
       "--num-processes", "2", "--process-id", i], 1, tmp_path, f"p{i}") for i in range(2)}
  out = _wait_all(procs, tmp_path, timeout=REAL_MNIST_TIMEOUT_S)
  for name, (code, _, err) in out.items():
    assert code == 0, f"{name}: {err[-3000:]}"
  results = json.loads((run / "results.json").read_text())
  assert results["processes"] == 2 and results["devices"] == 2
  assert results["final"]["test"]["digit_acc"] > 0.9

  predictor = predict.load(str(run))  # the checkpoint of both processes
  images, labels = _mnist_test_set(500)
  numbers = np.arange(500, dtype=np.int32) % 10
  digits, sums = predictor(images, numbers)
  assert np.mean(digits == labels) > 0.9 and np.mean(sums == labels + numbers) > 0.9


# `python -m adder.train` on fake data: 256 images, 8 steps of 32 per epoch.
_FAKE_DATA_CLI = """
import sys
from conftest import make_fake_mnist
from adder import cli, data
data.load_mnist = lambda mnist_dir=None, data_dir=None: make_fake_mnist()
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_process_that_dies_ends_the_other_with_an_error(tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = {f"p{i}": _start(
      ["-c", _FAKE_DATA_CLI, "--epochs", "1000", "--batch-size", "32", "--no-swa",
       "--workdir", tmp_path / "run", "--coordinator", coordinator, "--num-processes", "2",
       "--process-id", i], 1, tmp_path, f"p{i}") for i in range(2)}
  deadline = time.monotonic() + TIMEOUT_S
  while "epoch  1/1000" not in (tmp_path / "p0.out").read_text():  # training is under way
    if procs["p0"].poll() is not None or time.monotonic() > deadline:
      _kill_all(procs)
      pytest.fail("process 0 did not reach epoch 1: " + (tmp_path / "p0.err").read_text()[-3000:])
    time.sleep(0.5)
  procs["p1"].kill()
  # Within the heartbeat timeout at most; at once here, as its connections close.
  out = _wait_all(procs, tmp_path, timeout=distributed.DISTRIBUTED_TIMEOUTS["heartbeat_timeout_seconds"])
  code, _, err = out["p0"]
  errors = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 1 and len(errors) == 1, err[-3000:]
  assert "another process stopped" in errors[0] and "Traceback" not in err
