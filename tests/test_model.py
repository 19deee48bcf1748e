"""The network: shapes, parameter count, PyTorch-style BatchNorm, pooling."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import model as model_lib
from adder.config import Config


@pytest.fixture(scope="module")
def model_and_vars():
  model = model_lib.create_model(Config())
  return model, model_lib.init_variables(model, jax.random.PRNGKey(0))


def test_output_shapes_and_dtypes(model_and_vars):
  model, variables = model_and_vars
  images = model_lib.normalize_images(np.zeros((5, 28, 28), np.uint8))
  digit_logits, sum_logits = model.apply(variables, images, jnp.arange(5), train=False)
  chex.assert_shape(digit_logits, (5, 10))
  chex.assert_shape(sum_logits, (5, 19))
  chex.assert_type([digit_logits, sum_logits], jnp.float32)


def test_parameter_count(model_and_vars):
  # 5 bias-free 3x3 convs (144 + 3 * 2304 + 2880) + BatchNorm scale/bias (168)
  # + Dense 30->60, 60->60, 60->10, 60->19 (1860 + 3660 + 610 + 1159).
  # Changes only if the architecture does; the original had 17.3K.
  _, variables = model_and_vars
  assert model_lib.count_params(variables["params"]) == 17_393


def test_number_changes_only_the_sum_head_input(model_and_vars):
  model, variables = model_and_vars
  images = model_lib.normalize_images(
      np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8))
  images = jnp.repeat(images, 10, axis=0)
  digit_logits, sum_logits = model.apply(variables, images, jnp.arange(10), train=False)
  # Same image, different integers: the outputs must differ (the one-hot reaches the MLP).
  assert not np.allclose(sum_logits[0], sum_logits[1])
  assert not np.allclose(digit_logits[0], digit_logits[9])


def test_normalize_images():
  x = model_lib.normalize_images(np.array([[[0, 255]]], np.uint8).repeat(14, 2).repeat(28, 1))
  chex.assert_shape(x, (1, 28, 28, 1))
  np.testing.assert_allclose(x.min(), -0.1307 / 0.3081, rtol=1e-6)
  np.testing.assert_allclose(x.max(), (1 - 0.1307) / 0.3081, rtol=1e-6)
  # 4-D input keeps its shape; float input in [0, 255] is treated the same.
  y = model_lib.normalize_images(np.full((2, 28, 28, 1), 255.0, np.float32))
  np.testing.assert_allclose(y, (1 - 0.1307) / 0.3081, rtol=1e-6)


def test_batchnorm_stores_unbiased_variance_and_normalises_with_biased():
  bn = model_lib.BatchNorm(momentum=0.9)
  x = jnp.array([[1.0], [2.0], [3.0], [6.0]])  # mean 3, biased var 3.5, unbiased 14/3
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y[:, 0], (x[:, 0] - 3.0) / np.sqrt(3.5 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], [0.9 * 0 + 0.1 * 3.0], rtol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], [0.9 * 1 + 0.1 * 14 / 3], rtol=1e-6)
  # Eval mode uses the running statistics, not the batch's.
  y_eval = bn.apply({**variables, **updates}, x, train=False)
  np.testing.assert_allclose(
      y_eval[:, 0], (x[:, 0] - 0.3) / np.sqrt(0.9 + 1.4 / 3 + 1e-5), rtol=1e-5)


def test_max_pool_2x2_equals_flax_max_pool():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 6, 5))
  chex.assert_trees_all_equal(
      model_lib.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_eval_mode_is_per_example(model_and_vars):
  model, variables = model_and_vars
  images = model_lib.normalize_images(
      np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8))
  numbers = jnp.arange(6)
  full = model.apply(variables, images, numbers, train=False)
  part = model.apply(variables, images[:2], numbers[:2], train=False)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[:2], full), part, atol=1e-5)
