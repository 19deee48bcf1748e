"""The adder network: a small conv trunk plus an MLP over [embedding, one-hot].

Data representation (what `AdderNet.__call__` takes and returns):

* ``images``: float32, shape (N, 28, 28, 1) (NHWC), MNIST pixels normalised as
  ``(p / 255 - MNIST_MEAN) / MNIST_STD`` so that the training set has mean ~0
  and std ~1 (values in about [-0.42, 2.82]). `normalize_images` does this.
* ``numbers``: int32, shape (N,), values 0..9. Encoded inside the model as a
  one-hot float32 vector of length 10.
* outputs: ``digit_logits`` float32 (N, 10) and ``sum_logits`` float32 (N, 19);
  class k of the sum head is the sum k = digit + number, 0..18.

Architecture: five Conv(3x3, no bias, VALID)-BatchNorm-ReLU blocks with 2x2 max
pooling after the 2nd and 4th (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4 -> 2), then
global average pooling to a 20-feature image embedding. The embedding is
concatenated with the one-hot integer (20 + 10 = 30 features), then two
Dense(60)-ReLU layers and two linear heads. 17,393 trainable parameters.

BatchNorm follows PyTorch's ``nn.BatchNorm2d`` conventions (see `BatchNorm`),
so that weights and running statistics convert both ways without loss.

Two choices here are for speed and change no value beyond float32 rounding:
`conv_valid` runs its 16-channel convolutions on the CPU through kernels of
our own (`adder.conv_cpu`) and states the rest in the forms XLA:CPU runs
fast, and `BatchNorm` takes its batch moments in one pass. `max_pool_2x2`
states its gradient as PyTorch's, ties included.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adder import conv_cpu

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_DIGITS = 10
NUM_SUMS = 19  # 0 + 0 .. 9 + 9


def _pool_windows(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, H/2, 2, W/2, 2, C): the 2x2 windows of even H and W, as a view."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2: float (N, H, W, C) with even H and W -> (N, H/2, W/2, C).

  The values of ``nn.max_pool``, written as a reshape and a max rather than
  ``nn.max_pool``, whose gradient (``select_and_scatter``) is slow on XLA:CPU.
  The gradient is stated as ``torch.nn.MaxPool2d``'s: each window's goes whole
  to its first maximum in row-major order, where JAX's rule for a max would
  split it among ties. One select per window position; an epoch on the CPU
  takes as long as with JAX's rule (``experiments/conv_probe.py --cpu-forms``).
  """
  return _pool_windows(x).max(axis=(2, 4))


def _max_pool_fwd(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_bwd(residuals, g):
  x, y = residuals
  windows = _pool_windows(x)
  taken = jnp.zeros(y.shape, bool)  # a window's maximum already given the gradient
  rows = []
  for i in range(2):
    row = []
    for j in range(2):
      first = (windows[:, :, i, :, j] == y) & ~taken
      taken = taken | first
      row.append(jnp.where(first, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(row, 3))  # (N, H/2, W/2, 2, C)
  return (jnp.stack(rows, 2).reshape(x.shape),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, kernel: jax.Array, padding="VALID") -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC_HWIO)


@jax.custom_vjp
def conv_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 VALID convolution, NHWC input and HWIO kernel, as ``nn.Conv`` computes it.

  Any kernel size; the model uses 3x3.

  Args:
    x: float (N, H, W, Ci). kernel: float (kh, kw, Ci, Co).

  Returns:
    float (N, H - kh + 1, W - kw + 1, Co).

  The values and both gradients are ``lax.conv_general_dilated``'s up to
  float32 rounding; only their form differs, for the CPU's sake (on other
  backends `lax.platform_dependent` picks the plain forms):

  * Float32 convolutions whose input and output channels are multiples of 16
    (the model's 2nd to 4th layers), forward and both gradients, run on
    `adder.conv_cpu`'s direct kernels (through the XLA FFI) where those
    could be built and passed their self-check, are switched on
    (`adder.conv_cpu.use_kernels`, ``ADDER_CPU_KERNELS``) and one device
    trains. The rest stay XLA's, in these forms:
  * Gradients as canonical convolutions. JAX's own transpose rules give the
    input gradient a kernel with swapped in/out features and the kernel
    gradient an input with batch and features swapped. XLA:CPU runs such
    "non-canonical" convolutions on a fast library kernel only at the top
    level of a program: in a ``while``/``scan`` body they fall back to a naive
    loop (jax-ml/jax#12868), which made a scanned training step 7x slower than
    a lone one. Here each gradient is an ordinary NHWC x HWIO convolution with
    explicit transposes, so a whole epoch runs in one ``lax.scan``.
  * The kernel gradient in chunks of the batch (`_kernel_grad_chunked`).
  * Where the output is smaller than the kernel (the last layer), the input
    gradient as matrix products (`_input_grad_by_products`).
  * A one-channel input (the first layer) as one matrix product over its nine
    shifted windows (`_conv_windows`), twice as fast as XLA:CPU's convolution.
  """
  return _conv_forward(x, kernel)


def _windows(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """(N, H, W, C) -> (N, Ho, Wo, kh * kw, C): every VALID window position's shifted view."""
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.stack([x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)], 3)


def _conv_windows(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_conv` as one matrix product of the stacked windows with the kernel (im2col)."""
  kh, kw, ci, co = kernel.shape
  return jnp.einsum("nhwpc,pco->nhwo", _windows(x, kh, kw), kernel.reshape(kh * kw, ci, co))


def _conv_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  if conv_cpu.supports(kernel.shape, x.dtype):
    return lax.platform_dependent(x, kernel, cpu=conv_cpu.forward, default=_conv)
  if x.shape[-1] == 1:  # im2col costs kh * kw copies of the input: cheap for one channel
    return lax.platform_dependent(x, kernel, cpu=_conv_windows, default=_conv)
  return _conv(x, kernel)


def _conv_valid_fwd(x, kernel):
  return _conv_forward(x, kernel), (x, kernel)


# On the CPU the kernel gradient sums over chunks of at most this many images
# of the batch, and over at most `MAX_KERNEL_GRAD_CHUNKS` chunks.
KERNEL_GRAD_CHUNK = 16
MAX_KERNEL_GRAD_CHUNKS = 16


def _kernel_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """dL/dkernel of a VALID convolution: x (N, H, W, Ci), g (N, Ho, Wo, Co) -> (kh, kw, Ci, Co).

  The input's channels as the batch and its batch as the channels, correlated
  with g as the kernel: (Ci, H, W, N) x (Ho, Wo, N, Co) -> (Ci, kh, kw, Co).
  """
  return _conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3)).transpose(1, 2, 0, 3)


def _kernel_grad_chunked(x: jax.Array, g: jax.Array) -> jax.Array:
  """`_kernel_grad` as a sum over chunks of the batch (same shapes).

  In `_kernel_grad` the batch is the convolution's feature dimension. XLA:CPU
  sends a convolution with more than 16 features to YNNPACK, which runs this
  shape (a kernel nearly as large as the image, a 3x3 output) slowly, and more
  than twice as slowly for twice the batch: 32 ms for the second layer at
  batch 128 against 4.4 ms as eight Eigen convolutions of 16 images each.
  """
  n = x.shape[0]
  chunk = max(KERNEL_GRAD_CHUNK, -(-n // MAX_KERNEL_GRAD_CHUNKS))
  total = _kernel_grad(x[:chunk], g[:chunk])
  for start in range(chunk, n, chunk):
    total = total + _kernel_grad(x[start:start + chunk], g[start:start + chunk])
  return total


def _input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """dL/dx of a VALID convolution: g (N, Ho, Wo, Co), kernel (kh, kw, Ci, Co) -> (N, H, W, Ci).

  The full correlation of g with the flipped kernel, in/out features swapped.
  """
  kh, kw = kernel.shape[:2]
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, Co, Ci)
  return _conv(g, flipped, ((kh - 1, kh - 1), (kw - 1, kw - 1)))


def _input_grad_by_products(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """`_input_grad` as one matrix product and kh * kw shifted, zero-padded sums (same shapes).

  For an output smaller than the kernel (the last layer's 2x2 against 3x3),
  XLA:CPU swaps the correlation's operands into a non-canonical convolution
  and runs it on its naive loop; this form has no convolution.
  """
  kh, kw = kernel.shape[:2]
  parts = jnp.einsum("nhwo,ijco->ijnhwc", g, kernel)  # each tap's share, (kh, kw, N, Ho, Wo, Ci)
  dx = 0.0
  for i in range(kh):
    for j in range(kw):
      dx = dx + jnp.pad(parts[i, j], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
  return dx


def _conv_valid_bwd(residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  if conv_cpu.supports(kernel.shape, x.dtype):
    dx = lax.platform_dependent(g, kernel, cpu=conv_cpu.input_grad, default=_input_grad)
    dk = lax.platform_dependent(x, g, cpu=functools.partial(conv_cpu.kernel_grad, kh=kh, kw=kw),
                                default=_kernel_grad)
    return dx, dk
  if g.shape[1] < kh or g.shape[2] < kw:
    dx = lax.platform_dependent(g, kernel, cpu=_input_grad_by_products, default=_input_grad)
  else:
    dx = _input_grad(g, kernel)
  dk = lax.platform_dependent(x, g, cpu=_kernel_grad_chunked, default=_kernel_grad)
  return dx, dk


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


class Conv(nn.Module):
  """Bias-free stride-1 VALID convolution through `conv_valid` (``nn.Conv``'s parameters).

  Its parameter is ``kernel``, (kh, kw, Ci, features), initialised as
  ``nn.Conv``'s (LeCun normal), so checkpoints and `adder.convert` are unchanged.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel)  # float64 parameters: float64 compute
    return conv_valid(x, kernel)


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 or float pixels in [0, 255], (N, 28, 28[, 1]) -> float32 NHWC, normalised."""
  x = jnp.asarray(images, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  return (x / 255.0 - MNIST_MEAN) / MNIST_STD


class BatchNorm(nn.Module):
  """Batch normalisation with PyTorch's conventions, over all axes but the last.

  In training it normalises with the biased batch variance but stores the
  *unbiased* one (n / (n - 1) times larger) in ``batch_stats/var``, as
  ``torch.nn.BatchNorm2d`` does; Flax's ``nn.BatchNorm`` stores the biased one,
  which would make running statistics impossible to compare or convert.

  Attributes:
    momentum: Flax convention, ``running = momentum * running + (1 - momentum)
      * batch``; PyTorch's ``momentum=0.1`` is ``0.9`` here. ``0.0`` makes the
      running statistics equal to the last batch's (used to recompute them).
    epsilon: added to the variance before the square root (PyTorch's ``eps``).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if train:
      axes = tuple(range(x.ndim - 1))
      n = x.size // features
      # E[x] and E[x^2] are independent reductions (Flax's BatchNorm does the
      # same by default, use_fast_variance): with the batch split over
      # devices, XLA combines them into one all-reduce per layer instead of
      # two in sequence.
      mean = jnp.mean(x, axes)
      mean2 = jnp.mean(jnp.square(x), axes)
      var = jnp.maximum(mean2 - jnp.square(mean), 0.0)  # biased: used to normalise
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value

    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    return x * mul + (bias - mean * mul)


class AdderNet(nn.Module):
  """MNIST image + integer 0-9 -> (digit logits (N, 10), sum logits (N, 19))."""

  conv_features: Sequence[int] = (16, 16, 16, 16, 20)
  hidden_features: int = 60
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(
      self, images: jax.Array, numbers: jax.Array, *, train: bool
  ) -> tuple[jax.Array, jax.Array]:
    """Args: images float32 (N, 28, 28, 1) normalised; numbers int (N,) in 0..9."""
    x = images
    for i, features in enumerate(self.conv_features):
      x = Conv(features, (3, 3), name=f"conv{i}")(x)
      x = BatchNorm(self.bn_momentum, self.bn_epsilon, name=f"bn{i}")(x, train)
      x = nn.relu(x)
      if i in (1, 3):
        x = max_pool_2x2(x)
    embedding = jnp.mean(x, axis=(1, 2))  # (N, conv_features[-1])

    one_hot = jax.nn.one_hot(numbers, NUM_DIGITS, dtype=embedding.dtype)  # (N, 10)
    h = jnp.concatenate([embedding, one_hot], axis=-1)  # (N, 30)
    h = nn.relu(nn.Dense(self.hidden_features, name="fc0")(h))
    h = nn.relu(nn.Dense(self.hidden_features, name="fc1")(h))
    digit_logits = nn.Dense(NUM_DIGITS, name="digit_head")(h)
    sum_logits = nn.Dense(NUM_SUMS, name="sum_head")(h)
    return digit_logits, sum_logits


def create_model(config) -> AdderNet:
  """The model described by `config` (an `adder.config.Config`)."""
  return AdderNet(
      conv_features=tuple(config.conv_features),
      hidden_features=config.hidden_features,
      bn_momentum=config.bn_momentum,
      bn_epsilon=config.bn_epsilon,
  )


def init_variables(model: AdderNet, rng: jax.Array) -> dict:
  """{'params': ..., 'batch_stats': ...} for a model, from a PRNG key."""
  images = jnp.zeros((1, 28, 28, 1), jnp.float32)
  numbers = jnp.zeros((1,), jnp.int32)
  return dict(model.init(rng, images, numbers, train=False))


def count_params(params) -> int:
  """Number of trainable scalars in a params pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
