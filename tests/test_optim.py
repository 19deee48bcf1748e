"""The one-cycle schedules and the SWA averaging transform, in closed form."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adder import optim
from adder.config import Config


def test_onecycle_key_points():
  lr_fn, m_fn = optim.onecycle_schedules(100, 0.1)
  np.testing.assert_allclose(lr_fn(0), 0.1 / 25, rtol=1e-6)
  np.testing.assert_allclose(lr_fn(29), 0.1, rtol=1e-6)  # 0.3 * 100 - 1
  np.testing.assert_allclose(lr_fn(99), 0.1 / 25 / 1e4, rtol=1e-5)
  np.testing.assert_allclose(m_fn(0), 0.95, rtol=1e-6)
  np.testing.assert_allclose(m_fn(29), 0.85, rtol=1e-6)
  np.testing.assert_allclose(m_fn(99), 0.95, rtol=1e-6)
  # Half-way up the warm-up, cosine: exactly the mid-point.
  lr_fn, _ = optim.onecycle_schedules(201, 1.0, pct_start=101 / 201, div_factor=2.0)
  np.testing.assert_allclose(lr_fn(50), 0.75, rtol=1e-6)


def test_onecycle_rejects_bad_settings():
  with pytest.raises(ValueError):
    optim.onecycle_schedules(1, 0.1)
  with pytest.raises(ValueError):
    optim.onecycle_schedules(100, 0.1, pct_start=1.5)


def _run_sgd_swa(start_step, steps=6):
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  tx = optax.chain(optax.sgd(0.1), optim.swa(start_step))
  state = tx.init(params)
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2)
  iterates = []
  for _ in range(steps):
    updates, state = tx.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(params)
  return state[-1], iterates


def test_swa_mean_equals_mean_of_iterates():
  swa_state, iterates = _run_sgd_swa(start_step=2)
  expected = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *iterates[2:])
  chex.assert_trees_all_close(swa_state.mean, expected, rtol=1e-6)
  assert int(swa_state.n_averaged) == 4 and int(swa_state.count) == 6


def test_swa_passes_updates_through():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.arange(3.0)}
  updates, _ = optim.swa(0).update(grads, optim.swa(0).init(params), params)
  chex.assert_trees_all_equal(updates, grads)


def test_swa_from_step_zero_and_after_the_end():
  swa_state, iterates = _run_sgd_swa(start_step=0)
  expected = jax.tree_util.tree_map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *iterates)
  chex.assert_trees_all_close(swa_state.mean, expected, rtol=1e-6)
  late, _ = _run_sgd_swa(start_step=6)  # starts after the last update: nothing averaged
  assert int(late.n_averaged) == 0
  chex.assert_trees_all_equal(late.mean, jax.tree_util.tree_map(jnp.zeros_like, iterates[0]))


def test_swa_jits_and_validates():
  with pytest.raises(ValueError):
    optim.swa(-1)
  params = {"w": jnp.ones(2)}
  tx = optim.swa(1)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(3):
    _, state = update({"w": jnp.ones(2)}, state, params)
  assert int(state.n_averaged) == 2
  with pytest.raises(ValueError):
    tx.update({"w": jnp.ones(2)}, state)


def test_create_optimizer_matches_hand_written_sgd_with_momentum():
  config = Config(epochs=1, weight_decay=0.01, swa=False)
  tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=10)
  _, m_fn = optim.onecycle_schedules(10, config.lr)
  p = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(p)
  buf, w = None, np.array([1.0, 2.0])
  for k in range(4):
    g = np.array([0.5, -1.0]) * (k + 1)
    updates, state = tx.update({"w": jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, updates)
    d = g + 0.01 * w  # torch.optim.SGD: decay into the gradient, then momentum
    buf = d if buf is None else float(m_fn(k)) * buf + d
    w = w - float(lr_fn(k)) * buf
  np.testing.assert_allclose(p["w"], w, rtol=1e-5)


def test_swa_start_is_last_quarter_by_default():
  config = Config(epochs=20)
  assert optim.swa_start_step(config, 20 * 468) == 15 * 468
  tx, _ = optim.create_optimizer(config, 468)
  assert isinstance(optim.swa_state(tx.init({"w": jnp.ones(1)})), optim.SWAState)
  assert optim.swa_state(optim.create_optimizer(config.replace(swa=False), 468)[0].init(
      {"w": jnp.ones(1)})) is None


def test_swa_lr_holds_a_constant_rate_after_a_shorter_one_cycle():
  config = Config(epochs=4, swa_start_frac=0.75, swa_lr=0.03)
  tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=10)  # averaging from update 30
  cycle_lr, cycle_m = optim.onecycle_schedules(30, config.lr)
  for k in (0, 8, 20, 29):  # the one-cycle over the 30 updates before averaging
    np.testing.assert_allclose(lr_fn(k), cycle_lr(k), rtol=1e-6)
  for k in (30, 35, 39):
    np.testing.assert_allclose(lr_fn(k), 0.03, rtol=1e-6)
  # The rate and momentum SGD applies, read from its injected hyperparameters.
  p = {"w": jnp.ones(2)}
  state = tx.init(p)
  applied = []
  for _ in range(40):
    _, state = tx.update({"w": jnp.ones(2)}, state, p)
    hyper = state[0].hyperparams  # those of the update just made
    applied.append((float(hyper["learning_rate"]), float(hyper["momentum"])))
  np.testing.assert_allclose(applied[29], (cycle_lr(29), cycle_m(29)), rtol=1e-5)
  np.testing.assert_allclose(applied[30:], [(0.03, config.max_momentum)] * 10, rtol=1e-6)
  assert int(optim.swa_state(state).n_averaged) == 10
  # Without SWA, or without swa_lr, the one-cycle spans every update.
  for other in (config.replace(swa=False), config.replace(swa_lr=None)):
    np.testing.assert_allclose(optim.create_optimizer(other, 10)[1](35),
                               optim.onecycle_schedules(40, config.lr)[0](35), rtol=1e-6)
