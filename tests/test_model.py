"""The network: shapes, parameter count, PyTorch-style BatchNorm, pooling, the convolution."""

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


def _autodiff_max_pool(x):
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def test_max_pool_2x2_gradient_without_ties_is_autodiffs():
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 6, 5))  # no two entries equal
  g = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 3, 5))
  got = jax.vjp(model_lib.max_pool_2x2, x)[1](g)[0]
  chex.assert_trees_all_equal(got, jax.vjp(_autodiff_max_pool, x)[1](g)[0])
  # Exactly one entry per window gets its gradient, the rest zero.
  assert int(jnp.sum(got != 0)) == g.size


def test_max_pool_2x2_gradient_goes_to_the_first_maximum_as_in_pytorch():
  # Windows (rows of 2x2): one maximum, a tie in the second row, a tie in the
  # first column, all equal. torch.nn.MaxPool2d gives each window's gradient
  # whole to its first maximum in row-major order.
  windows = np.array([[[1, 3], [3, 2]], [[0, 1], [4, 4]], [[7, 0], [7, 1]], [[2, 2], [2, 2]]],
                     np.float32)
  x = jnp.asarray(windows.transpose(1, 0, 2).reshape(1, 2, 8, 1))  # four windows side by side
  g = jnp.asarray([10.0, 20.0, 30.0, 40.0]).reshape(1, 1, 4, 1)
  got = np.asarray(jax.vjp(model_lib.max_pool_2x2, x)[1](g)[0]).reshape(2, 4, 2).transpose(1, 0, 2)
  want = np.zeros_like(windows)
  for k, (i, j) in enumerate([(0, 1), (1, 0), (0, 0), (0, 0)]):
    want[k, i, j] = g[0, 0, k, 0]
  np.testing.assert_array_equal(got, want)


def test_eval_mode_is_per_example(model_and_vars):
  model, variables = model_and_vars
  images = model_lib.normalize_images(
      np.random.default_rng(1).integers(0, 256, (6, 28, 28), dtype=np.uint8))
  numbers = jnp.arange(6)
  full = model.apply(variables, images, numbers, train=False)
  part = model.apply(variables, images[:2], numbers[:2], train=False)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[:2], full), part, atol=1e-5)


def _stock_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("n,h,w,ci,co,k", [
    (4, 28, 28, 1, 16, 3),   # the first layer
    (3, 12, 12, 16, 16, 3),  # a middle layer
    (40, 12, 12, 16, 16, 3),  # kernel gradient in chunks of 16, 16 and 8 images
    (2, 4, 4, 16, 20, 3),    # the last: a 2x2 output
    (2, 9, 7, 3, 5, 2),      # odd, non-square, another kernel size
])
def test_conv_valid_values_and_both_gradients_equal_lax_conv(n, h, w, ci, co, k):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(n * h + ci), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  kernel = jax.random.normal(kk, (k, k, ci, co))
  out, vjp = jax.vjp(model_lib.conv_valid, x, kernel)
  ref_out, ref_vjp = jax.vjp(_stock_conv, x, kernel)
  chex.assert_shape(out, (n, h - k + 1, w - k + 1, co))
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  g = jax.random.normal(kg, out.shape)
  for got, want in zip(vjp(g), ref_vjp(g)):
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n,chunks", [(16, 1), (17, 2), (128, 8), (1000, 16)])
def test_kernel_gradient_in_chunks_equals_the_whole(n, chunks):
  x = jax.random.normal(jax.random.PRNGKey(n), (n, 6, 6, 2))
  g = jax.random.normal(jax.random.PRNGKey(n + 1), (n, 4, 4, 3))
  lowered = jax.jit(model_lib._kernel_grad_chunked).lower(x, g).as_text()
  assert lowered.count("stablehlo.convolution") == chunks
  whole = model_lib._kernel_grad(x, g)
  # Sums of 16 n products, added in another order: float32 rounding of the largest.
  np.testing.assert_allclose(model_lib._kernel_grad_chunked(x, g), whole, rtol=0,
                             atol=1e-5 * float(jnp.abs(whole).max()))


def test_input_gradient_of_an_output_smaller_than_the_kernel_has_no_convolution():
  # XLA:CPU would run that correlation on its naive loop (operands swapped).
  x, kernel = jnp.zeros((2, 4, 4, 16)), jnp.ones((3, 3, 16, 20))
  g = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 20))
  dx = jax.jit(lambda g: model_lib._conv_valid_bwd((x, kernel), g)[0])
  assert "convolution(" not in dx.lower(g).compile().as_text()
  np.testing.assert_allclose(dx(g), model_lib._input_grad(g, kernel), atol=1e-5, rtol=1e-5)


def test_conv_valid_gradients_inside_a_scan_equal_lax_conv():
  # The custom backward pass is what runs inside `train_epoch`'s scan.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 10, 10, 4))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 6))

  def total(conv):
    def body(k, xs):
      return k - 0.01 * jax.grad(lambda k: jnp.sum(conv(xs, k) ** 2))(k), None
    return jax.jit(lambda k: jax.lax.scan(body, k, x)[0])(kernel)

  np.testing.assert_allclose(total(model_lib.conv_valid), total(_stock_conv), rtol=1e-5, atol=1e-5)


def test_conv_module_keeps_nn_conv_parameters():
  x = jnp.ones((1, 8, 8, 3))
  ours = model_lib.Conv(7).init(jax.random.PRNGKey(0), x)
  flax_conv = nn.Conv(7, (3, 3), padding="VALID", use_bias=False).init(jax.random.PRNGKey(0), x)
  # Same name, shape and initialiser: checkpoints and adder.convert are unchanged.
  chex.assert_trees_all_close(ours, flax_conv)


def test_batchnorm_one_pass_variance_is_accurate_off_centre():
  # E[x^2] - E[x]^2 in float32 against the two-pass variance in float64, for
  # activations whose mean is several standard deviations from zero.
  x = 3.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(0), (64, 24, 24, 16))
  bn = model_lib.BatchNorm(momentum=0.0)
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  _, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  want = np.var(np.asarray(x, np.float64).reshape(-1, 16), axis=0, ddof=1)
  np.testing.assert_allclose(updates["batch_stats"]["var"], want, rtol=1e-4)
