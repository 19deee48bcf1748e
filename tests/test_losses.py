"""adder.losses: the heads' cross-entropies and the consistency term, in closed form."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from adder import losses


def test_loss_of_uniform_logits_is_log10_plus_log19():
  loss, (d, s) = losses.cross_entropy_loss(
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
  agree = losses.consistency_loss(digit_logits, _agreeing_heads(digit_logits, numbers), numbers)
  chex.assert_shape(agree, (6,))
  np.testing.assert_allclose(agree, 0.0, atol=1e-5)
  sum_logits = jnp.asarray(rng.normal(0, 2, (6, 19)), jnp.float32)
  assert np.all(losses.consistency_loss(digit_logits, sum_logits, numbers) > 1e-3)


def test_consistency_loss_pulls_each_head_toward_the_other_held_fixed():
  rng = np.random.default_rng(1)
  digit_logits = jnp.asarray(rng.normal(0, 2, (5, 10)), jnp.float32)
  sum_logits = jnp.asarray(rng.normal(0, 2, (5, 19)), jnp.float32)
  numbers = jnp.array([0, 9, 4, 2, 6])
  loss = lambda d, s: losses.consistency_loss(d, s, numbers).sum()
  d_grad, s_grad = jax.grad(loss, argnums=(0, 1))(digit_logits, sum_logits)
  # Cross-entropy toward a fixed target t has the gradient softmax(logits) - t.
  possible = numbers[:, None] + jnp.arange(10)
  rows = jnp.arange(5)[:, None]
  sum_as_digit = jax.nn.softmax(sum_logits[rows, possible])  # the sum head's digits
  digit_as_sum = jnp.zeros((5, 19)).at[rows, possible].set(jax.nn.softmax(digit_logits))
  np.testing.assert_allclose(d_grad, jax.nn.softmax(digit_logits) - sum_as_digit, atol=1e-6)
  np.testing.assert_allclose(s_grad, jax.nn.softmax(sum_logits) - digit_as_sum, atol=1e-6)



def test_case_losses_average_to_the_batch_loss():
  rng = np.random.default_rng(3)
  digit_logits = jnp.asarray(rng.normal(0, 2, (7, 10)), jnp.float32)
  sum_logits = jnp.asarray(rng.normal(0, 2, (7, 19)), jnp.float32)
  digits, numbers = jnp.array([0, 1, 2, 3, 4, 5, 9]), jnp.array([9, 0, 3, 3, 7, 1, 9])
  ce, _ = losses.cross_entropy_loss(digit_logits, sum_logits, digits, digits + numbers)
  consistency = losses.consistency_loss(digit_logits, sum_logits, numbers).mean()
  for weight in (0.0, 0.7):
    got = losses.case_losses(digit_logits, sum_logits, digits, numbers, weight)
    chex.assert_shape(got, (7,))
    np.testing.assert_allclose(got.mean(), ce + weight * consistency, rtol=1e-6)
