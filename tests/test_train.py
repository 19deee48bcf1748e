"""Training: the loss, the pure step, BatchNorm recompute, a short run, resuming, the CLI."""

import functools
import json
import math
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import checkpoint
from adder import data as data_lib
from adder import model as model_lib
from adder import optim
from adder import tensorboard
from adder import train as train_lib
from adder.config import Config, run_differences
from conftest import REPO

# Every epoch saved: the resume tests stop after any. Fake blob patterns are
# learnt in three short epochs only as they are, so TINY does not augment;
# TINY_AUGMENTED (the default bounds) checks that resuming draws the same transforms.
TINY = Config(epochs=3, batch_size=32, lr=0.05, eval_batch_size=64, swa_start_frac=0.5,
              save_every_s=0.0).without_augmentation()
TINY_AUGMENTED = TINY.replace(augment_shift_px=Config().augment_shift_px,
                              augment_rotate_deg=Config().augment_rotate_deg,
                              augment_scale=Config().augment_scale)


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


def _agreeing_heads(digit_logits, numbers):
  """Sum logits that say what the digit logits say: number + digit, nothing else possible."""
  possible = numbers[:, None] + jnp.arange(10)
  sum_logits = jnp.full((len(numbers), 19), -1e9)
  return sum_logits.at[jnp.arange(len(numbers))[:, None], possible].set(digit_logits + 3.0)


def test_consistency_loss_is_zero_when_the_heads_agree():
  rng = np.random.default_rng(0)
  digit_logits = jnp.asarray(rng.normal(0, 2, (6, 10)), jnp.float32)
  numbers = jnp.array([0, 9, 3, 5, 1, 7])
  agree = train_lib.consistency_loss(digit_logits, _agreeing_heads(digit_logits, numbers), numbers)
  chex.assert_shape(agree, (6,))
  np.testing.assert_allclose(agree, 0.0, atol=1e-5)
  sum_logits = jnp.asarray(rng.normal(0, 2, (6, 19)), jnp.float32)
  assert np.all(train_lib.consistency_loss(digit_logits, sum_logits, numbers) > 1e-3)


def test_consistency_loss_pulls_each_head_toward_the_other_held_fixed():
  rng = np.random.default_rng(1)
  digit_logits = jnp.asarray(rng.normal(0, 2, (5, 10)), jnp.float32)
  sum_logits = jnp.asarray(rng.normal(0, 2, (5, 19)), jnp.float32)
  numbers = jnp.array([0, 9, 4, 2, 6])
  loss = lambda d, s: train_lib.consistency_loss(d, s, numbers).sum()
  d_grad, s_grad = jax.grad(loss, argnums=(0, 1))(digit_logits, sum_logits)
  # Cross-entropy toward a fixed target t has the gradient softmax(logits) - t.
  possible = numbers[:, None] + jnp.arange(10)
  rows = jnp.arange(5)[:, None]
  sum_as_digit = jax.nn.softmax(sum_logits[rows, possible])  # the sum head's digits
  digit_as_sum = jnp.zeros((5, 19)).at[rows, possible].set(jax.nn.softmax(digit_logits))
  np.testing.assert_allclose(d_grad, jax.nn.softmax(digit_logits) - sum_as_digit, atol=1e-6)
  np.testing.assert_allclose(s_grad, jax.nn.softmax(sum_logits) - digit_as_sum, atol=1e-6)


def test_smoothed_cross_entropy_spreads_eps_over_every_class():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(0, 2, (6, 19)), jnp.float32)
  labels = jnp.array([0, 18, 3, 7, 7, 11])
  log_p = jax.nn.log_softmax(logits)
  plain = -log_p[jnp.arange(6), labels]
  np.testing.assert_allclose(train_lib.head_cross_entropy(logits, labels), plain, rtol=1e-6)
  eps = 0.2
  smoothed = train_lib.head_cross_entropy(logits, labels, eps)
  chex.assert_shape(smoothed, (6,))
  np.testing.assert_allclose(smoothed, (1 - eps) * plain - eps * log_p.mean(-1), rtol=1e-5)


@pytest.mark.parametrize("weight,eps", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.1)])
def test_train_step_objective_is_cross_entropy_plus_weighted_consistency(fake_mnist, weight,
                                                                         eps):
  state, _ = train_lib.create_train_state(
      TINY.replace(consistency_weight=weight, label_smoothing=eps), jax.random.PRNGKey(0), 8)
  assert (state.consistency_weight, state.label_smoothing) == (weight, eps)
  batch = _batch(fake_mnist)
  _, metrics = train_lib.train_step(state, batch)
  (digit_logits, sum_logits), _ = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
      batch["number"], train=True, mutable=["batch_stats"])
  ce, _ = train_lib.cross_entropy_loss(digit_logits, sum_logits, batch["digit"], batch["sum"],
                                      eps)
  consistency = train_lib.consistency_loss(digit_logits, sum_logits, batch["number"]).mean()
  assert float(consistency) > 1e-3  # untrained heads disagree
  np.testing.assert_allclose(metrics["loss"], ce + weight * consistency, rtol=1e-5)
  assert ("consistency_loss" in metrics) == (weight > 0)


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


@pytest.mark.parametrize("config, recomputed", [
    (TINY_AUGMENTED, True),
    (TINY_AUGMENTED.replace(plain_batch_stats=False), False),
    (TINY, False),  # no augmentation: the original's final weights
])
def test_final_weights_get_plain_batch_stats_after_augmented_training(
    fake_mnist, config, recomputed):
  s, state = train_lib.setup(config, fake_mnist)
  weight_sets = train_lib.final_weight_sets(config, s, state)
  n = s.steps_per_epoch * config.batch_size
  plain = train_lib.recompute_batch_stats(
      s.model, state.params, s.train_x,
      jnp.arange(n, dtype=jnp.int32).reshape(-1, config.batch_size))
  final = weight_sets["final"]["batch_stats"]
  assert config.recomputes_final_batch_stats == recomputed
  chex.assert_trees_all_equal(weight_sets["final"]["params"], state.params)
  if recomputed:
    chex.assert_trees_all_close(final, plain, atol=1e-6)
  else:
    chex.assert_trees_all_equal(final, state.batch_stats)
  # The running statistics of a fresh state (mean 0, variance 1) are not the plain images'.
  assert not np.allclose(plain["bn0"]["mean"], state.batch_stats["bn0"]["mean"], atol=1e-3)


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
  # Falls every epoch (by 12% over the three with the consistency term, which
  # rises while the heads grow confident; the accuracy below shows learning).
  assert rows[2]["train_loss"] < rows[1]["train_loss"] < rows[0]["train_loss"]
  # Ten fixed blob patterns: far better than chance (0.1) after three epochs.
  assert results["final"]["test"]["digit_acc"] > 0.5
  # The last row scored the last iterate, as results.json's "final" does.
  assert rows[-1]["test_loss"] == pytest.approx(results["final"]["test"]["loss"], rel=1e-6)
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]


@pytest.mark.parametrize("weight,eps", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.1)])
def test_evaluate_loss_is_the_training_loss_in_eval_mode(fake_mnist, weight, eps):
  model = model_lib.create_model(TINY)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  images, labels = jnp.asarray(fake_mnist["test_images"]), fake_mnist["test_labels"]
  index = np.arange(len(labels), dtype=np.int32)
  numbers = data_lib.test_numbers(len(labels), TINY.eval_seed)
  eval_fn = jax.jit(functools.partial(train_lib.eval_step, model.apply,
                                      consistency_weight=weight, label_smoothing=eps))
  # 64 cases in chunks of 48: the second chunk is padded, and its padding ignored.
  scores, (digit_pred, sum_pred) = train_lib.evaluate(
      eval_fn, variables, images, labels, index, numbers, batch_size=48)
  digit_logits, sum_logits = model.apply(
      variables, model_lib.normalize_images(images), jnp.asarray(numbers), train=False)
  expected, _ = train_lib.cross_entropy_loss(digit_logits, sum_logits, labels, labels + numbers,
                                             eps)
  expected += weight * train_lib.consistency_loss(digit_logits, sum_logits, numbers).mean()
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


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "adder.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--swa-lr", "0"], "--swa-lr must be a positive number"),
    (["--consistency-weight", "-1"], "--consistency-weight must be a number >= 0"),
    (["--consistency-weight", "nan"], "--consistency-weight must be a number >= 0"),
    (["--batch-size", "x"], "invalid int value"),
    (["--augment-shift", "-1"], "--augment-shift must be between 0 and 14"),
    (["--augment-rotate", "200"], "--augment-rotate must be between 0 and 180"),
    (["--augment-scale", "0.6"], "--augment-scale must be between 0 and 0.5"),
    (["--augment-elastic", "-0.5"], "--augment-elastic must be between 0 and 5"),
    (["--augment-elastic-sigma", "0"], "--augment-elastic-sigma must be between 0.5 and 14"),
    (["--label-smoothing", "1"], "--label-smoothing must be at least 0 and less than 1"),
    (["--epochs", "2", "--plain-last-epochs", "3"],
     "--plain-last-epochs must be between 0 and --epochs"),
])
def test_cli_rejects_bad_flags(args, message):
  r = _cli(*args)
  assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_cli_recipe_flags_reach_the_config():
  config, _ = train_lib.parse_args(["--consistency-weight", "0.25", "--swa-lr", "0.01",
                                    "--augment-elastic", "0.5", "--augment-elastic-sigma", "3"])
  assert (config.consistency_weight, config.swa_lr) == (0.25, 0.01)
  assert (config.augment_elastic_px, config.augment_elastic_sigma) == (0.5, 3.0)
  assert train_lib.parse_args([])[0] == Config()
  assert not train_lib.parse_args(["--running-batch-stats"])[0].plain_batch_stats
  assert train_lib.parse_args(["--label-smoothing", "0.1"])[0].label_smoothing == 0.1


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


@pytest.fixture(scope="module")
def short_run_augmented(fake_mnist, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run_augmented"))
  results = train_lib.train_and_evaluate(TINY_AUGMENTED, workdir, dataset=fake_mnist)
  return workdir, results


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
  save_state = train_lib.save_state
  with monkeypatch.context() as m:
    # Epoch 2 is trained and logged but not saved; the run stops as epoch 3 starts.
    m.setattr(train_lib, "save_state", lambda states, epoch, *rest: None if epoch == 2
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


def test_run_differences_ignore_where_the_data_is():
  assert run_differences(TINY, TINY.replace(mnist_dir="/a", data_dir="/b", require_gpu=True,
                                            eval_batch_size=7)) == {}
  assert run_differences(TINY, TINY.replace(lr=0.1, swa=False)) == {
      "lr": (0.05, 0.1), "swa": (True, False)}


def test_a_config_saved_before_a_field_existed_reads_as_it_ran():
  saved = Config().to_dict()
  for name in ("augment_scale", "consistency_weight", "plain_last_epochs", "swa_lr",
               "plain_batch_stats", "label_smoothing"):
    del saved[name]
  old = Config.from_dict({**saved, "unknown_field": 1})
  assert (old.augment_scale, old.consistency_weight, old.plain_last_epochs, old.swa_lr,
          old.plain_batch_stats, old.label_smoothing) == (0.0, 0.0, 0, None, False, 0.0)
  assert Config().consistency_weight > 0 and Config().augment_scale > 0  # not the defaults
  assert Config().plain_batch_stats
  assert Config.from_dict(Config().to_dict()) == Config()


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
from adder import data, train
data.load_mnist = lambda mnist_dir=None, data_dir=None: make_fake_mnist(num_train=4096)
sys.exit(train.main(sys.argv[1:]))
"""


def _fake_data_cli_env():
  tests = os.path.dirname(os.path.abspath(__file__))
  return {**os.environ, "PYTHONPATH": os.pathsep.join(
      p for p in (tests, str(REPO), os.environ.get("PYTHONPATH")) if p)}


def test_cli_sigterm_saves_the_last_epoch_and_a_rerun_resumes(tmp_path):
  args = [sys.executable, "-c", _FAKE_DATA_CLI, "--epochs", "3", "--batch-size", "32",
          "--lr", "0.05", "--no-swa", "--save-every", "0", "--workdir", str(tmp_path / "run")]
  proc = subprocess.Popen(args, cwd=REPO, env=_fake_data_cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stdout:  # training has begun once epoch 1 is logged
      if line.startswith("epoch  1/3"):
        break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 143, stderr
  assert "Traceback" not in stderr
  stopped = [l for l in stderr.splitlines() if l.startswith("stopped by SIGTERM")]
  assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], stderr
  saved = int(stopped[0].split("; epoch ")[1].split()[0])
  assert 1 <= saved < 3
  assert [r["epoch"] for r in _rows(tmp_path / "run")] == list(range(1, saved + 1))

  r = subprocess.run(args, cwd=REPO, env=_fake_data_cli_env(), capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert f"resuming after epoch {saved}/3" in r.stdout
  assert [r["epoch"] for r in _rows(tmp_path / "run")] == [1, 2, 3]
  assert os.path.exists(tmp_path / "run" / "results.json")


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
