"""adder.step: the pure train step, its scan, and the jitted epoch."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import data as data_lib
from adder import losses
from adder import step as step_lib
from conftest import TINY


def _batch(dataset, bs=16, seed=0):
  rng = np.random.default_rng(seed)
  idx = jnp.asarray(rng.integers(0, len(dataset["train_labels"]), bs), jnp.int32)
  nums = jnp.asarray(rng.integers(0, 10, bs), jnp.int32)
  return step_lib.make_batch(jnp.asarray(dataset["train_images"]),
                              jnp.asarray(dataset["train_labels"]), idx, nums)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_train_step_objective_is_cross_entropy_plus_weighted_consistency(fake_mnist, weight):
  state, _ = step_lib.create_train_state(
      TINY.replace(consistency_weight=weight), jax.random.PRNGKey(0), 8)
  assert state.consistency_weight == weight
  batch = _batch(fake_mnist)
  _, metrics = step_lib.train_step(state, batch)
  (digit_logits, sum_logits), _ = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
      batch["number"], train=True, mutable=["batch_stats"])
  ce, _ = losses.cross_entropy_loss(digit_logits, sum_logits, batch["digit"], batch["sum"])
  consistency = losses.consistency_loss(digit_logits, sum_logits, batch["number"]).mean()
  assert float(consistency) > 1e-3  # untrained heads disagree
  np.testing.assert_allclose(metrics["loss"], ce + weight * consistency, rtol=1e-5)
  assert ("consistency_loss" in metrics) == (weight > 0)


def test_make_batch_labels(fake_mnist):
  b = _batch(fake_mnist)
  chex.assert_shape(b["image"], (16, 28, 28, 1))
  np.testing.assert_array_equal(b["sum"], b["digit"] + b["number"])
  assert int(b["sum"].min()) >= 0 and int(b["sum"].max()) <= 18


def test_train_step_is_pure_and_jit_agrees(fake_mnist):
  state, _ = step_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  batch = _batch(fake_mnist)
  s1, m1 = step_lib.train_step(state, batch)
  s2, m2 = jax.jit(step_lib.train_step)(state, batch)
  chex.assert_trees_all_close((s1.params, s1.batch_stats, m1), (s2.params, s2.batch_stats, m2),
                              atol=1e-5)
  assert int(state.step) == 0 and int(s1.step) == 1  # input untouched, step advanced
  assert not np.allclose(s1.batch_stats["bn0"]["mean"], state.batch_stats["bn0"]["mean"])


def test_train_batch_compiles_once(fake_mnist):
  state, _ = step_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  indices, numbers = data_lib.epoch_plan(jax.random.PRNGKey(1), 0, len(y), 16)
  fn = jax.jit(chex.assert_max_traces(step_lib.train_batch, n=1))
  for k in range(3):
    state, _ = fn(state, x, y, indices[k], numbers[k])
  assert int(state.step) == 3


def test_scan_of_steps_equals_steps_one_by_one(fake_mnist):
  state, _ = step_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  indices, numbers = data_lib.epoch_plan(jax.random.PRNGKey(1), 0, len(y), 16)
  scanned, metrics = jax.jit(step_lib.train_steps)(state, x, y, indices[:3], numbers[:3])
  for k in range(3):
    state, _ = step_lib.train_batch(state, x, y, indices[k], numbers[k])
  chex.assert_shape(metrics["loss"], (3,))
  chex.assert_trees_all_close(scanned.params, state.params, atol=1e-5)


def test_train_epoch_is_its_plan_scanned_and_compiles_once(fake_mnist):
  state, _ = step_lib.create_train_state(TINY, jax.random.PRNGKey(0), 8)
  x, y = jnp.asarray(fake_mnist["train_images"]), jnp.asarray(fake_mnist["train_labels"])
  key = jax.random.PRNGKey(3)
  epoch_fn = functools.partial(jax.jit(chex.assert_max_traces(step_lib.train_epoch, n=1),
                                       static_argnames="batch_size"), batch_size=32)
  by_epoch, metrics = epoch_fn(state, x, y, key, 1)
  by_epoch, _ = epoch_fn(by_epoch, x, y, key, 2)  # another epoch: no new trace
  expected = state
  for epoch in (1, 2):
    indices, numbers = data_lib.epoch_plan(key, epoch, len(y), 32)
    expected, _ = jax.jit(step_lib.train_steps)(expected, x, y, indices, numbers)
  chex.assert_shape(metrics["loss"], (len(y) // 32,))
  assert int(by_epoch.step) == 2 * (len(y) // 32)
  chex.assert_trees_all_close((by_epoch.params, by_epoch.batch_stats),
                              (expected.params, expected.batch_stats), atol=1e-6)


# One step of the default loss from a fixed init on fixed fake data. These values
# were computed before `adder.train` was split into modules and are unchanged by it.
# A change to the model, its initialisation, the loss, the optimizer or the data
# gathering changes them: update them only for a change meant to alter the numbers,
# and say so in its commit.
GOLDEN_METRICS = {"loss": 5.986021041870117, "digit_loss": 2.267301082611084,
                  "sum_loss": 2.9862828254699707, "consistency_loss": 0.732437014579773}
# Per layer: (sum of the new weights, sum of |update|).
GOLDEN_PARAMS = {
    "conv0": (5.566007614135742, 0.008433448150753975),
    "conv2": (-1.3007981777191162, 0.07681923359632492),
    "fc0": (-19.37830352783203, 0.02131720259785652),
    "digit_head": (2.9304039478302, 0.009828455746173859),
    "sum_head": (2.502020835876465, 0.019976940006017685),
}


def test_one_step_from_a_fixed_init_gives_the_stored_values(fake_mnist):
  state, _ = step_lib.create_train_state(TINY.replace(consistency_weight=1.0),
                                         jax.random.PRNGKey(0), 8)
  new, metrics = jax.jit(step_lib.train_step)(state, _batch(fake_mnist))
  for name, want in GOLDEN_METRICS.items():
    np.testing.assert_allclose(float(metrics[name]), want, rtol=1e-6, atol=1e-6, err_msg=name)
  for layer, (total, moved) in GOLDEN_PARAMS.items():
    kernel, before = new.params[layer]["kernel"], state.params[layer]["kernel"]
    np.testing.assert_allclose(float(jnp.sum(kernel)), total, atol=1e-6, err_msg=layer)
    np.testing.assert_allclose(float(jnp.sum(jnp.abs(kernel - before))), moved, atol=1e-6,
                               err_msg=layer)
