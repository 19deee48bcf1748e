"""experiments/gpu_run.sh on the CPU: its checks, its plan, and its refusals.

The real run needs a GPU; here the dry run must check everything else (imports,
the prepared dataset read without preparing) and print the exact commands.
"""

import os
import subprocess
import sys
from importlib import metadata

import jax
import pytest

from conftest import REPO

SCRIPT = REPO / "experiments" / "gpu_run.sh"


def _gpu_run(*args, cwd, timeout=300):
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, "PYTHON": sys.executable})


def _one_error_line(r) -> str:
  assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr
  return errors[0]


def test_dry_run_checks_and_prints_the_plan(prepared_mnist, tmp_path):
  out = tmp_path / "out"
  r = _gpu_run("--dry-run", "--data-dir", prepared_mnist, "--out", "out", "--epochs", "3",
               cwd=tmp_path)
  assert r.returncode == 0, (r.stdout, r.stderr)
  assert f"adder from {REPO / 'adder'}" in r.stdout  # PYTHONPATH set by the script
  assert f"JAX {jax.__version__}: backend {jax.default_backend()}" in r.stdout
  assert f"tensorboardX {metadata.version('tensorboardX')}" in r.stdout  # from the wheels there
  assert f"found MNIST as array_record: {prepared_mnist}/mnist/3.0.1" in r.stdout
  assert (f"-m adder.train --require-gpu --data-dir {prepared_mnist} --workdir {out}/run "
          f"2>&1 | tee {out}/train.log") in r.stdout
  assert (f"experiments/benchmark.py --device gpu --data-dir {prepared_mnist} "
          f"--out {out}/BENCHMARKS.gpu.md --json {out}/bench.json --epochs 3 --seeds 1 "
          f"--steps 300 2>&1 | tee {out}/benchmark.log") in r.stdout
  if jax.default_backend() != "gpu":
    assert "no GPU here" in r.stdout
  assert not out.exists()  # a dry run writes nothing


def test_real_run_without_a_gpu_is_one_error_line(prepared_mnist, tmp_path):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: the script would train")
  r = _gpu_run("--data-dir", prepared_mnist, "--out", str(tmp_path / "out"), cwd=tmp_path,
               timeout=120)
  assert "no GPU" in _one_error_line(r)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--data-dir is required"),
    (["--data-dir", "d", "--steps", "0"], "--steps must be a positive integer"),
    (["--data-dir", "d", "--wheels", "nowhere"], "no .whl files in"),
    (["--data-dir"], "--data-dir needs a value"),
    (["--data-dir", "d", "--bogus"], "unknown argument --bogus"),
])
def test_bad_arguments_are_one_error_line(args, message, tmp_path):
  assert message in _one_error_line(_gpu_run(*args, cwd=tmp_path))


def test_unprepared_data_dir_is_one_error_line(tmp_path):
  r = _gpu_run("--dry-run", "--data-dir", "empty", cwd=tmp_path)
  assert f"MNIST is not prepared in {tmp_path / 'empty'}" in _one_error_line(r)
