"""Augmentation: exact on identities, shifts and quarter turns; deterministic; in the epoch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import augment
from adder import step as step_lib
from adder.config import Config


def _images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, (n, 28, 28)), jnp.float32)


def test_identity_transform_leaves_images_unchanged():
  x = _images()
  y = augment.affine_transform(x, jnp.zeros(4), jnp.zeros((4, 2)))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  z = augment.random_affine(jax.random.PRNGKey(3), x, shift_px=0.0, rotate_deg=0.0)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(x))


@pytest.mark.parametrize("shift", [(1, 0), (0, -2), (3, 2)])
def test_integer_shift_moves_pixels_and_brings_in_background(shift):
  x = _images(1)
  y = np.asarray(augment.affine_transform(x, jnp.zeros(1), jnp.asarray([shift], jnp.float32)))
  expected = np.zeros((1, 28, 28), np.float32)
  dy, dx = shift
  src = np.asarray(x)[:, max(-dy, 0):28 - max(dy, 0), max(-dx, 0):28 - max(dx, 0)]
  expected[:, max(dy, 0):28 - max(-dy, 0), max(dx, 0):28 - max(-dx, 0)] = src
  np.testing.assert_array_equal(y, expected)


def test_quarter_turn_is_rot90_counter_clockwise():
  x = _images(2)
  y = augment.affine_transform(x, jnp.full(2, np.pi / 2, jnp.float32), jnp.zeros((2, 2)))
  np.testing.assert_allclose(np.asarray(y), np.rot90(np.asarray(x), 1, axes=(1, 2)),
                             atol=1e-3)


def test_half_pixel_shift_averages_neighbours():
  x = _images(1)
  y = augment.affine_transform(x, jnp.zeros(1), jnp.asarray([[0.0, 0.5]]))
  # Output column j reads input column j - 0.5: the mean of columns j - 1 and j.
  np.testing.assert_allclose(np.asarray(y)[0, :, 1:],
                             (np.asarray(x)[0, :, :-1] + np.asarray(x)[0, :, 1:]) / 2, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(y)[0, :, 0], np.asarray(x)[0, :, 0] / 2, rtol=1e-6)


def test_scale_about_the_centre_on_a_ramp():
  # Bilinear sampling is exact on a linear image: column j of the output reads
  # column (j - c) / s + c of the input, whose value is that column's index.
  ramp = jnp.broadcast_to(jnp.arange(28, dtype=jnp.float32), (2, 28, 28))
  scale = jnp.asarray([2.0, 0.5])
  y = np.asarray(augment.affine_transform(ramp, jnp.zeros(2), jnp.zeros((2, 2)), scale))
  c = 13.5
  np.testing.assert_allclose(y[0, 13], (np.arange(28) - c) / 2 + c, rtol=1e-6)  # all inside
  inside = np.abs(np.arange(28) - c) * 2 <= c  # shrunk: the edges read outside the image
  np.testing.assert_allclose(y[1, 13, inside], ((np.arange(28) - c) * 2 + c)[inside], atol=1e-5)
  assert y[1, 13, 0] == 0 and y[1, 13, -1] == 0 and y[1, 0].max() == 0  # background
  no_scale = augment.affine_transform(ramp, jnp.zeros(2), jnp.zeros((2, 2)), jnp.ones(2))
  np.testing.assert_array_equal(np.asarray(no_scale), np.asarray(ramp))


def test_random_scale_keeps_the_angles_and_shifts_drawn_without_it():
  x = _images(8)
  key = jax.random.PRNGKey(5)
  rotated = augment.random_affine(key, x, shift_px=0.0, rotate_deg=10.0)
  scaled = augment.random_affine(key, x, shift_px=0.0, rotate_deg=10.0, scale=0.2)
  assert not np.allclose(np.asarray(rotated), np.asarray(scaled))
  only_scaled = augment.random_affine(key, x, shift_px=0.0, rotate_deg=0.0, scale=0.2)
  # The mass of a centred blob grows with the square of the factor: between 0.64 and 1.44.
  blob = jnp.zeros((8, 28, 28)).at[:, 10:18, 10:18].set(100.0)
  ratio = augment.random_affine(key, blob, shift_px=0.0, rotate_deg=0.0, scale=0.2).sum(
      (1, 2)) / blob.sum((1, 2))
  assert np.all((ratio > 0.6) & (ratio < 1.5)) and np.ptp(np.asarray(ratio)) > 0.05
  assert only_scaled.shape == x.shape and only_scaled.dtype == x.dtype


def test_random_affine_is_deterministic_from_its_key_and_keeps_shape_and_dtype():
  x = _images(8)
  f = jax.jit(lambda k, x: augment.random_affine(k, x, shift_px=2.0, rotate_deg=10.0))
  a, b = f(jax.random.PRNGKey(0), x), f(jax.random.PRNGKey(0), x)
  c = f(jax.random.PRNGKey(1), x)
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  # Every image moved, none by more than the bounds allow: the mass stays close.
  assert np.all(np.any(np.asarray(a) != np.asarray(x), axis=(1, 2)))


def test_step_keys_differ_by_step_and_epoch_and_repeat():
  key = jax.random.PRNGKey(0)
  k1, k1_again, k2 = (augment.step_keys(key, e, 5) for e in (1, 1, 2))
  data = lambda k: np.asarray(jax.random.key_data(k)) if jnp.issubdtype(
      k.dtype, jax.dtypes.prng_key) else np.asarray(k)
  np.testing.assert_array_equal(data(k1), data(k1_again))
  assert len({tuple(r) for r in data(k1).reshape(5, -1)}) == 5
  assert not np.array_equal(data(k1), data(k2))


def test_config_augmentation_switch():
  assert Config().augment and step_lib.create_augment(Config()) is not None
  plain = Config().without_augmentation()
  assert not plain.augment and step_lib.create_augment(plain) is None
  assert Config(augment_shift_px=0.0).augment  # rotation alone still augments
  assert Config(augment_shift_px=0.0, augment_rotate_deg=0.0, augment_scale=0.1).augment
  assert Config(augment_scale=0.1).without_augmentation().augment_scale == 0.0


def test_epoch_with_augmentation_is_deterministic_and_differs_from_without(fake_mnist):
  x = jnp.asarray(fake_mnist["train_images"])
  y = jnp.asarray(fake_mnist["train_labels"])
  key = jax.random.PRNGKey(1)

  def run(config):
    state, _ = step_lib.create_train_state(config, jax.random.PRNGKey(0), 8)
    epoch = jax.jit(step_lib.train_epoch, static_argnames=("batch_size", "augment"))
    aug = step_lib.create_augment(config)
    for e in (1, 2):
      state, m = epoch(state, x, y, key, e, batch_size=32, augment=aug)
    return state.params, m["loss"]

  config = Config(batch_size=32, epochs=2)
  (p1, l1), (p2, l2) = run(config), run(config)
  chex.assert_trees_all_equal(p1, p2)
  (p3, l3) = run(config.without_augmentation())
  assert np.all(np.isfinite(np.asarray(l1)))
  assert not np.allclose(np.asarray(l1), np.asarray(l3))
