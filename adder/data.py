"""MNIST in, device arrays out; (image, integer) pairs made on the device.

* `load_mnist` reads MNIST through tensorflow-datasets into host numpy arrays:
  images uint8 (N, 28, 28) in [0, 255], white digit on black; labels int32 (N,)
  in 0..9. Offline, a folder with the four official IDX ``.gz`` files serves as
  TFDS's manual directory (TFDS checks its registered checksums).
* `epoch_plan` draws, on the device, one epoch of training pairs: a fresh
  permutation of the images, batched, and a fresh uniform integer 0..9 for
  each, both keyed by (seed, epoch). No per-sample Python work.
* `test_numbers` and `exhaustive_pairs` give the fixed evaluation pairs.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_DIR_ENV = "ADDER_MNIST_DIR"
_WHOLE_SPLIT = 1 << 20  # a batch size larger than any MNIST split


class DataError(RuntimeError):
  """The dataset cannot be found or prepared; the message says what to do."""


def resolve_mnist_dir(mnist_dir: Optional[str]) -> Optional[str]:
  """The manual directory to use: the argument, else $ADDER_MNIST_DIR, else None."""
  mnist_dir = mnist_dir or os.environ.get(MNIST_DIR_ENV) or None
  if mnist_dir is None:
    return None
  missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(mnist_dir, f))]
  if missing:
    raise DataError(
        f"MNIST folder {mnist_dir!r} lacks {', '.join(missing)}: put the four "
        f"official IDX .gz files there, or pass --mnist-dir / ${MNIST_DIR_ENV}")
  return mnist_dir


def _hide_gpus_from_tensorflow() -> None:
  # TFDS only decodes PNGs here: keep TensorFlow off the GPUs JAX trains on.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass


def load_mnist(
    mnist_dir: Optional[str] = None, data_dir: Optional[str] = None
) -> dict[str, np.ndarray]:
  """MNIST via TFDS, as host arrays.

  Args:
    mnist_dir: folder with the four official IDX .gz files (TFDS manual
      directory); None uses $ADDER_MNIST_DIR, else lets TFDS download.
    data_dir: where TFDS keeps prepared datasets; None: $TFDS_DATA_DIR or
      TFDS's default (~/tensorflow_datasets).

  Returns:
    ``train_images`` uint8 (60000, 28, 28), ``train_labels`` int32 (60000,),
    ``test_images`` uint8 (10000, 28, 28), ``test_labels`` int32 (10000,).

  Raises:
    DataError: the files are missing, fail TFDS's checksums, or cannot be fetched.
  """
  mnist_dir = resolve_mnist_dir(mnist_dir)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _hide_gpus_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  download_config = tfds.download.DownloadConfig(manual_dir=mnist_dir)
  try:
    splits = tfds.load(
        "mnist",
        split=["train", "test"],
        data_dir=data_dir,
        as_supervised=True,
        download_and_prepare_kwargs={"download_config": download_config},
    )
  except Exception as e:  # TFDS raises many types; all mean "no dataset".
    where = mnist_dir or "the internet"
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(
        f"could not prepare MNIST from {where} ({type(e).__name__}: {first_line}); "
        f"give --mnist-dir (or ${MNIST_DIR_ENV}) a folder with the four official "
        "IDX .gz files") from e
  # One batch holding the whole split (batch_size=-1 fails on datasets of
  # unknown length, such as TFDS's mocked ones).
  (train_x, train_y), (test_x, test_y) = (
      next(iter(tfds.as_numpy(ds.batch(_WHOLE_SPLIT)))) for ds in splits)
  return {
      "train_images": np.asarray(train_x, np.uint8).reshape(-1, 28, 28),
      "train_labels": np.asarray(train_y, np.int32),
      "test_images": np.asarray(test_x, np.uint8).reshape(-1, 28, 28),
      "test_labels": np.asarray(test_y, np.int32),
  }


def epoch_plan(
    key: jax.Array, epoch: int | jax.Array, num_images: int, batch_size: int
) -> tuple[jax.Array, jax.Array]:
  """One epoch of training pairs, drawn on the device from ``fold_in(key, epoch)``.

  The images are reshuffled and cut into ``num_images // batch_size`` full
  batches (the remainder, fewer than ``batch_size`` images, waits for another
  epoch's shuffle). Each image is paired with a uniform integer 0..9.

  Returns:
    ``(indices, numbers)``, both int32 of shape (steps, batch_size): image
    indices into the training set, and the integers paired with them.
  """
  steps = num_images // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_images} images")
  perm_key, number_key = jax.random.split(jax.random.fold_in(key, epoch))
  perm = jax.random.permutation(perm_key, num_images)[: steps * batch_size]
  numbers = jax.random.randint(number_key, (steps, batch_size), 0, 10, jnp.int32)
  return perm.reshape(steps, batch_size).astype(jnp.int32), numbers


def test_numbers(num_images: int, seed: int) -> np.ndarray:
  """The fixed integers of the `test` set: one uniform 0..9 per image, int32 (N,)."""
  key = jax.random.PRNGKey(seed)
  return np.asarray(jax.random.randint(key, (num_images,), 0, 10, jnp.int32))


def exhaustive_pairs(num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Every image with every integer: ``(image_index, number)``, int32 (N * 10,).

  Case ``10 * i + k`` pairs image ``i`` with integer ``k``.
  """
  image_index = np.repeat(np.arange(num_images, dtype=np.int32), 10)
  numbers = np.tile(np.arange(10, dtype=np.int32), num_images)
  return image_index, numbers
