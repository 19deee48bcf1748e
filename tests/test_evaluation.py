"""adder.evaluation: the eval step and chunked scoring of fixed pairs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import data as data_lib
from adder import evaluation
from adder import losses
from adder import model as model_lib
from conftest import TINY


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_evaluate_loss_is_the_training_loss_in_eval_mode(fake_mnist, weight):
  model = model_lib.create_model(TINY)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  images, labels = jnp.asarray(fake_mnist["test_images"]), fake_mnist["test_labels"]
  index = np.arange(len(labels), dtype=np.int32)
  numbers = data_lib.test_numbers(len(labels), TINY.eval_seed)
  eval_fn = jax.jit(functools.partial(evaluation.eval_step, model.apply,
                                      consistency_weight=weight))
  # 64 cases in chunks of 48: the second chunk is padded, and its padding ignored.
  scores, (digit_pred, sum_pred) = evaluation.evaluate(
      eval_fn, variables, images, labels, index, numbers, batch_size=48)
  digit_logits, sum_logits = model.apply(
      variables, model_lib.normalize_images(images), jnp.asarray(numbers), train=False)
  expected, _ = losses.cross_entropy_loss(digit_logits, sum_logits, labels, labels + numbers)
  expected += weight * losses.consistency_loss(digit_logits, sum_logits, numbers).mean()
  assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)
  np.testing.assert_array_equal(digit_pred, np.argmax(digit_logits, -1))
  np.testing.assert_array_equal(sum_pred, np.argmax(sum_logits, -1))
