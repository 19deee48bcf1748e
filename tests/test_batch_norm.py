"""adder.batch_norm: BatchNorm statistics recomputed as torch's update_bn does, and where
training uses them (adder.evaluation.final_weight_sets)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import batch_norm
from adder import evaluation
from adder import model as model_lib
from adder import train as train_lib
from conftest import TINY, TINY_AUGMENTED


def test_recompute_batch_stats_averages_batch_statistics(fake_mnist):
  model = model_lib.create_model(TINY)
  params = model_lib.init_variables(model, jax.random.PRNGKey(0))["params"]
  x = jnp.asarray(fake_mnist["train_images"])
  indices = jnp.arange(48, dtype=jnp.int32).reshape(3, 16)
  got = batch_norm.recompute_batch_stats(model, params, x, indices)
  per_batch = [batch_norm.batch_statistics(model, params, x, i) for i in indices]
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
  weight_sets = evaluation.final_weight_sets(state, s.plain_batch_stats,
                                           config.recomputes_final_batch_stats)
  n = s.steps_per_epoch * config.batch_size
  plain = batch_norm.recompute_batch_stats(
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
