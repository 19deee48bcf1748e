"""The training loss: each head's cross-entropy, and the heads' agreement term.

`cross_entropy_loss` is the original's loss: the digit head's mean
cross-entropy plus the sum head's. `consistency_loss` is the term the default
recipe adds (``Config.consistency_weight``): each head is trained toward the
other's prediction, read through sum = digit + number. All functions are pure
and jit-friendly; `adder.step.objective` combines them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adder import model as model_lib


def head_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Each case's cross-entropy against its integer label.

  Args: logits float32 (B, K); integer labels (B,) in 0..K-1.
  Returns: float32 (B,).
  """
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy_loss(
    digit_logits: jax.Array, sum_logits: jax.Array, digits: jax.Array, sums: jax.Array,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean cross-entropy of the digit head plus mean cross-entropy of the sum head.

  Args: logits float32 (B, 10) and (B, 19); integer labels (B,).
  Returns: ``(total, (digit_loss, sum_loss))``, float32 scalars.
  """
  digit_loss = head_cross_entropy(digit_logits, digits).mean()
  sum_loss = head_cross_entropy(sum_logits, sums).mean()
  return digit_loss + sum_loss, (digit_loss, sum_loss)


def consistency_loss(
    digit_logits: jax.Array, sum_logits: jax.Array, numbers: jax.Array
) -> jax.Array:
  """How far the two heads disagree, each read through sum = digit + number.

  The sum head's probabilities of the ten sums the number allows (number + 0
  .. number + 9), renormalised, are a distribution over digits; the digit
  head's distribution, moved up by the number, is one over sums. Each head is
  pulled toward the other's, which is held fixed (a stop-gradient target):
  KL(sum head's digits || digit head) + KL(digit head's sums || sum head).

  Args: logits float32 (B, 10) and (B, 19); numbers int (B,) in 0..9.
  Returns: float32 (B,), each case's, >= 0; 0 where the heads agree.
  """
  possible = numbers[:, None] + jnp.arange(model_lib.NUM_DIGITS)  # (B, 10) sums
  log_digit = jax.nn.log_softmax(digit_logits)
  log_sum = jnp.take_along_axis(jax.nn.log_softmax(sum_logits), possible, axis=1)
  log_sum_as_digit = jax.nn.log_softmax(jnp.take_along_axis(sum_logits, possible, axis=1))

  def kl(log_target, log_p):  # the target held fixed
    log_target = jax.lax.stop_gradient(log_target)
    return jnp.sum(jnp.exp(log_target) * (log_target - log_p), axis=-1)

  return kl(log_sum_as_digit, log_digit) + kl(log_digit, log_sum)


def case_losses(digit_logits: jax.Array, sum_logits: jax.Array, digits: jax.Array,
                numbers: jax.Array, consistency_weight: float = 0.0) -> jax.Array:
  """Each case's training loss: both cross-entropies plus the weighted consistency term.

  Their mean over a batch is `adder.step.objective`'s loss.

  Args: logits float32 (B, 10) and (B, 19); digits and numbers int (B,) in
    0..9; a static weight >= 0.
  Returns: float32 (B,).
  """
  loss = (head_cross_entropy(digit_logits, digits)
          + head_cross_entropy(sum_logits, digits + numbers))
  if consistency_weight:
    loss = loss + consistency_weight * consistency_loss(digit_logits, sum_logits, numbers)
  return loss
