"""BatchNorm statistics recomputed for given weights, as ``torch.optim.swa_utils.update_bn``.

Averaged (SWA) parameters never ran forward during training, so they have no
running statistics of their own; after augmented training the final weights'
running statistics describe augmented batches, not the plain images that are
evaluated. Both get statistics recomputed here: each batch's mean and unbiased
variance from a train-mode forward pass, averaged over the batches in one
jitted ``lax.scan``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from adder import model as model_lib


def batch_statistics(
    model: model_lib.AdderNet,
    params: Any,
    images_u8: jax.Array,
    indices: jax.Array,
    batch_sharding: Optional[NamedSharding] = None,
) -> Any:
  """Per-layer BatchNorm statistics (mean, unbiased var) of one batch, train mode.

  Args: indices int32 (B,) into ``images_u8`` uint8 (N, 28, 28).
  Returns: a ``batch_stats`` pytree for `model`.
  """
  probe = model.clone(bn_momentum=0.0)  # running stats := this batch's
  template = jax.eval_shape(
      functools.partial(model_lib.init_variables, model), jax.random.PRNGKey(0))
  stats = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), template["batch_stats"])
  images = model_lib.normalize_images(images_u8[indices])
  if batch_sharding is not None:
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
  _, updates = probe.apply(
      {"params": params, "batch_stats": stats}, images,
      jnp.zeros(indices.shape, jnp.int32), train=True, mutable=["batch_stats"])
  return updates["batch_stats"]


def recompute_batch_stats(
    model: model_lib.AdderNet,
    params: Any,
    images_u8: jax.Array,
    indices: jax.Array,
    batch_sharding: Optional[NamedSharding] = None,
) -> Any:
  """BatchNorm running statistics for `params`, as ``update_bn`` computes them.

  Each batch's statistics come from a forward pass in training mode (mean and
  unbiased variance); the result is their plain average over the batches
  (PyTorch's cumulative average, ``momentum=None``), accumulated in a
  ``lax.scan``. The integer input does not reach any BatchNorm layer, so zeros
  stand in for it. Jit it with `model` and ``batch_sharding`` static.

  Args:
    indices: int32 (steps, B), the batches of images to use.

  Returns:
    A ``batch_stats`` pytree for `model`.
  """

  def body(avg, xs):
    k, batch_idx = xs
    stats = batch_statistics(model, params, images_u8, batch_idx, batch_sharding)
    return jax.tree_util.tree_map(lambda a, s: a + (s - a) / (k + 1), avg, stats), None

  shapes = jax.eval_shape(functools.partial(batch_statistics, model),
                          params, images_u8, indices[0])
  zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  steps = jnp.arange(indices.shape[0], dtype=jnp.float32)
  avg, _ = jax.lax.scan(body, zeros, (steps, indices))
  return avg


# One jitted recompute: the final and the averaged weights share its compilation.
_recompute_batch_stats_jit = jax.jit(recompute_batch_stats, static_argnums=0,
                                     static_argnames="batch_sharding")


def plain_batch_stats(
    model: model_lib.AdderNet,
    params: Any,
    images_u8: jax.Array,
    batch_size: int,
    batch_sharding: Optional[NamedSharding] = None,
) -> Any:
  """BatchNorm statistics of `params` over one pass of the plain training images.

  The batches are ``images_u8`` (uint8 (N, 28, 28)) in order, `batch_size`
  images each, the last partial batch dropped (`recompute_batch_stats`): what
  ``update_bn`` does over an unshuffled, unaugmented loader.
  """
  steps = images_u8.shape[0] // batch_size
  indices = jnp.arange(steps * batch_size, dtype=jnp.int32).reshape(steps, batch_size)
  return _recompute_batch_stats_jit(model, params, images_u8, indices,
                                    batch_sharding=batch_sharding)
