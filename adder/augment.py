"""Random small transforms of training images, drawn and applied on the device.

Each training image is rotated by a uniform angle in ``[-rotate_deg,
rotate_deg]`` about its centre, optionally scaled about it by a uniform factor
in ``[1 - scale, 1 + scale]``, and shifted by a uniform offset in
``[-shift_px, shift_px]`` pixels along each axis, the usual augmentation for
MNIST. The whole batch is transformed at once inside the jitted step: the
parameters come from `jax.random` and the resampling is a bilinear gather, so
there is no per-image Python and no trip to the host.

`affine_transform` is the deterministic part (given angles, shifts and
scales); `random_affine` draws them. Pixels are raw intensities
(0 = background), so what the transform brings in from outside the image is
background.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def affine_transform(
    images: jax.Array, angle: jax.Array, shift: jax.Array, scale: jax.Array | None = None,
) -> jax.Array:
  """Rotate and scale each image about its centre, then shift it; bilinear, zeros outside.

  Output pixel ``p`` (row, column) takes the input at ``R(-angle) (p - c -
  shift) / scale + c``, with ``c`` the image centre, so a
  positive angle turns the content counter-clockwise as displayed (rows down),
  a scale above 1 enlarges it, and a shift of ``(1, 0)`` moves it one row down.
  An angle of 0, no scale and an integer shift copy pixels
  exactly.

  Args:
    images: float (B, H, W) pixel intensities.
    angle: float (B,), radians.
    shift: float (B, 2), (rows, columns) in pixels.
    scale: float (B,), positive factors; None: no scaling.

  Returns:
    float (B, H, W), the same dtype as `images`.
  """
  b, h, w = images.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=images.dtype),
                            jnp.arange(w, dtype=images.dtype), indexing="ij")
  dy = rows[None] - cy - shift[:, 0, None, None]  # (B, H, W)
  dx = cols[None] - cx - shift[:, 1, None, None]
  if scale is not None:
    dy, dx = dy / scale[:, None, None], dx / scale[:, None, None]
  cos = jnp.cos(angle)[:, None, None]
  sin = jnp.sin(angle)[:, None, None]
  src_y = cos * dy + sin * dx + cy
  src_x = -sin * dy + cos * dx + cx
  return _bilinear(images, src_y, src_x)


def _bilinear(images: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
  """``images`` (B, H, W) sampled at float coordinates (B, H, W); 0 outside."""
  b, h, w = images.shape
  flat = images.reshape(b, h * w)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = y - y0, x - x0
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  out = jnp.zeros_like(images)
  for dy, fy in ((0, 1.0 - wy), (1, wy)):
    for dx, fx in ((0, 1.0 - wx), (1, wx)):
      yi, xi = y0 + dy, x0 + dx
      inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      index = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(b, h * w)
      value = jnp.take_along_axis(flat, index, axis=1).reshape(b, h, w)
      out = out + jnp.where(inside, fy * fx * value, 0.0)
  return out


SCALE_STREAM = 2  # folded into a batch's key for its scales


def random_affine(
    key: jax.Array, images: jax.Array, *, shift_px: float, rotate_deg: float,
    scale: float = 0.0,
) -> jax.Array:
  """`affine_transform` with per-image angles, shifts and scales drawn uniformly from `key`.

  Args:
    key: a PRNG key; the same key gives the same transforms.
    images: float (B, H, W) pixel intensities.
    shift_px: the largest shift along each axis, in pixels (0: none).
    rotate_deg: the largest rotation either way, in degrees (0: none).
    scale: the largest relative change of size either way, in [0, 1) (0:
      none). The scales come from a key of their own, so the angles and shifts
      are those drawn without scaling.

  Returns:
    float (B, H, W).
  """
  b = images.shape[0]
  shift_key, angle_key = jax.random.split(key)
  shift = jax.random.uniform(shift_key, (b, 2), images.dtype, -shift_px, shift_px)
  angle = jax.random.uniform(angle_key, (b,), images.dtype, -1.0, 1.0) * jnp.deg2rad(
      rotate_deg)
  factor = None
  if scale > 0:
    factor = jax.random.uniform(jax.random.fold_in(key, SCALE_STREAM), (b,), images.dtype,
                                1.0 - scale, 1.0 + scale)
  return affine_transform(images, angle, shift, factor)


AUGMENT_STREAM = 1  # folded into an epoch's key for its transforms (the plan uses it split)


def step_keys(key: jax.Array, epoch: int | jax.Array, steps: int) -> jax.Array:
  """One PRNG key per step of `epoch`: (steps, ...) keys of that epoch's transforms.

  Derived from ``fold_in(key, epoch)``, the key of `adder.data.epoch_plan`,
  so a run's transforms depend on (seed, epoch, step) alone, and a resumed run
  draws the same ones.
  """
  return jax.random.split(jax.random.fold_in(jax.random.fold_in(key, epoch), AUGMENT_STREAM),
                          steps)
