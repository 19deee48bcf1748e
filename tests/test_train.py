"""Training: the loss, the pure step, BatchNorm recompute, a short run, the CLI."""

import functools
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import data as data_lib
from adder import model as model_lib
from adder import train as train_lib
from adder.config import Config
from conftest import REPO

TINY = Config(epochs=3, batch_size=32, lr=0.05, eval_batch_size=64, swa_start_frac=0.5)


def _batch(dataset, bs=16, seed=0):
  rng = np.random.default_rng(seed)
  idx = jnp.asarray(rng.integers(0, len(dataset["train_labels"]), bs), jnp.int32)
  nums = jnp.asarray(rng.integers(0, 10, bs), jnp.int32)
  return train_lib.make_batch(jnp.asarray(dataset["train_images"]),
                              jnp.asarray(dataset["train_labels"]), idx, nums)


def test_loss_of_uniform_logits_is_log10_plus_log19():
  loss, (d, s) = train_lib.cross_entropy_loss(
      jnp.zeros((4, 10)), jnp.zeros((4, 19)), jnp.array([0, 1, 2, 3]), jnp.array([0, 5, 9, 18]))
  np.testing.assert_allclose([d, s, loss], [math.log(10), math.log(19), math.log(190)], rtol=1e-6)


def test_make_batch_labels(fake_mnist):
  b = _batch(fake_mnist)
  chex.assert_shape(b["image"], (16, 28, 28, 1))
  np.testing.assert_array_equal(b["sum"], b["digit"] + b["number"])
  assert int(b["sum"].min()) >= 0 and int(b["sum"].max()) <= 18


def test_train_step_is_pure_and_jit_agrees(fake_mnist):
  state, _ = train_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  batch = _batch(fake_mnist)
  s1, m1 = train_lib.train_step(state, batch)
  s2, m2 = jax.jit(train_lib.train_step)(state, batch)
  chex.assert_trees_all_close((s1.params, s1.batch_stats, m1), (s2.params, s2.batch_stats, m2),
                              atol=1e-5)
  assert int(state.step) == 0 and int(s1.step) == 1  # input untouched, step advanced
  assert not np.allclose(s1.batch_stats["bn0"]["mean"], state.batch_stats["bn0"]["mean"])


def test_train_batch_compiles_once(fake_mnist):
  state, _ = train_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  indices, numbers = data_lib.epoch_plan(jax.random.PRNGKey(1), 0, len(y), 16)
  fn = jax.jit(chex.assert_max_traces(train_lib.train_batch, n=1))
  for k in range(3):
    state, _ = fn(state, x, y, indices[k], numbers[k])
  assert int(state.step) == 3


def test_scan_of_steps_equals_steps_one_by_one(fake_mnist):
  state, _ = train_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  indices, numbers = data_lib.epoch_plan(jax.random.PRNGKey(1), 0, len(y), 16)
  scanned, metrics = jax.jit(train_lib.train_steps)(state, x, y, indices[:3], numbers[:3])
  for k in range(3):
    state, _ = train_lib.train_batch(state, x, y, indices[k], numbers[k])
  chex.assert_shape(metrics["loss"], (3,))
  chex.assert_trees_all_close(scanned.params, state.params, atol=1e-5)


def test_recompute_batch_stats_averages_batch_statistics(fake_mnist):
  model = model_lib.create_model(TINY)
  params = model_lib.init_variables(model, jax.random.PRNGKey(0))["params"]
  x = jnp.asarray(fake_mnist["train_images"])
  indices = jnp.arange(48, dtype=jnp.int32).reshape(3, 16)
  got = train_lib.recompute_batch_stats(model, params, x, indices)
  per_batch = [train_lib.batch_statistics(model, params, x, i) for i in indices]
  expected = jax.tree_util.tree_map(lambda *s: jnp.mean(jnp.stack(s), 0), *per_batch)
  chex.assert_trees_all_close(got, expected, atol=1e-6)
  # The first layer's mean is the plain mean of its pre-BN activations per batch.
  conv = lambda imgs: jax.lax.conv_general_dilated(
      model_lib.normalize_images(imgs), params["conv0"]["kernel"], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  direct = jnp.mean(jnp.stack([conv(x[i]).mean((0, 1, 2)) for i in indices]), 0)
  np.testing.assert_allclose(got["bn0"]["mean"], direct, atol=1e-5)


@pytest.fixture(scope="module")
def short_run(fake_mnist, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train_lib.train_and_evaluate(TINY, workdir, dataset=fake_mnist)
  return workdir, results


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_short_run_loss_falls_and_learns(short_run):
  workdir, results = short_run
  rows = _rows(workdir)
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"]
  # Ten fixed blob patterns: far better than chance (0.1) after three epochs.
  assert results["final"]["test"]["digit_acc"] > 0.5
  # The last row scored the last iterate, as results.json's "final" does.
  assert rows[-1]["test_loss"] == pytest.approx(results["final"]["test"]["loss"], rel=1e-6)
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]


def test_evaluate_loss_is_the_training_loss_in_eval_mode(fake_mnist):
  model = model_lib.create_model(TINY)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  images, labels = jnp.asarray(fake_mnist["test_images"]), fake_mnist["test_labels"]
  index = np.arange(len(labels), dtype=np.int32)
  numbers = data_lib.test_numbers(len(labels), TINY.eval_seed)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model.apply))
  # 64 cases in chunks of 48: the second chunk is padded, and its padding ignored.
  scores, (digit_pred, sum_pred) = train_lib.evaluate(
      eval_fn, variables, images, labels, index, numbers, batch_size=48)
  digit_logits, sum_logits = model.apply(
      variables, model_lib.normalize_images(images), jnp.asarray(numbers), train=False)
  expected, _ = train_lib.cross_entropy_loss(digit_logits, sum_logits, labels, labels + numbers)
  assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)
  np.testing.assert_array_equal(digit_pred, np.argmax(digit_logits, -1))
  np.testing.assert_array_equal(sum_pred, np.argmax(sum_logits, -1))


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
  assert on_disk["config"]["batch_size"] == 32


def test_artifacts_and_checkpoint_predicts_like_training(short_run, fake_mnist):
  from adder import predict  # pylint: disable=g-import-not-at-top
  workdir, results = short_run
  for name in ("loss.png", "accuracy.png", "lr.png", "samples.png", "confusion.png"):
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


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "adder.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--batch-size", "x"], "invalid int value"),
])
def test_cli_rejects_bad_flags(args, message):
  r = _cli(*args)
  assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


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


def test_one_epoch_on_real_mnist(prepared_mnist, tmp_path):
  config = Config(epochs=1, data_dir=prepared_mnist)
  results = train_lib.train_and_evaluate(config, str(tmp_path / "run"), write_artifacts=False)
  assert results["final"]["test"]["digit_acc"] >= 0.97
  assert results["final"]["exhaustive"]["joint_acc"] >= 0.95


def test_train_epoch_is_its_plan_scanned_and_compiles_once(fake_mnist):
  state, _ = train_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  key = jax.random.PRNGKey(3)
  epoch_fn = functools.partial(jax.jit(chex.assert_max_traces(train_lib.train_epoch, n=1),
                                       static_argnames="batch_size"), batch_size=32)
  by_epoch, metrics = epoch_fn(state, x, y, key, 1)
  by_epoch, _ = epoch_fn(by_epoch, x, y, key, 2)  # another epoch: no new trace
  expected = state
  for epoch in (1, 2):
    indices, numbers = data_lib.epoch_plan(key, epoch, len(y), 32)
    expected, _ = jax.jit(train_lib.train_steps)(expected, x, y, indices, numbers)
  chex.assert_shape(metrics["loss"], (len(y) // 32,))
  assert int(by_epoch.step) == 2 * (len(y) // 32)
  chex.assert_trees_all_close((by_epoch.params, by_epoch.batch_stats),
                              (expected.params, expected.batch_stats), atol=1e-6)
