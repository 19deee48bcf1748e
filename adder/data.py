"""MNIST in, device arrays out; (image, integer) pairs made on the device.

* `prepare_mnist` writes MNIST once, through tensorflow-datasets, as an
  ArrayRecord dataset (``DATA_DIR/mnist/3.0.1``, 26 MB). It is the only step
  that needs TensorFlow, imported here alone, lazily, with the GPUs hidden
  from it. Offline, a folder with the four official IDX ``.gz`` files serves as
  TFDS's manual directory (TFDS checks its registered checksums). Without
  one, TFDS downloads the files; if their host cannot be reached within
  seconds, preparing stops at once with one line saying how to pass them.
* `read_mnist` reads a prepared dataset through ``tfds.data_source`` (random
  access to the ArrayRecord files, no TensorFlow) and decodes the PNGs with
  Pillow, into host numpy arrays: images uint8 (N, 28, 28) in [0, 255], white
  digit on black; labels int32 (N,) in 0..9, in TFDS's record order. A
  prepared folder can be copied to a host that has no TensorFlow.
* `load_mnist` reads, preparing first if the data dir holds no dataset.
* ``python -m adder.data --mnist-dir DIR --data-dir OUT`` prepares, verifies
  (`check_mnist`) and says what to copy.
* `epoch_plan` draws, on the device, one epoch of training pairs: a fresh
  permutation of the images, batched, and a fresh uniform integer 0..9 for
  each, both keyed by (seed, epoch). No per-sample Python work.
* `test_numbers` and `exhaustive_pairs` give the fixed evaluation pairs.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MNIST_DIR_ENV = "ADDER_MNIST_DIR"
DATASET = "mnist"  # the TFDS name, and the folder it is prepared in
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
# The one format `tfds.data_source` reads without TensorFlow (tfds.load reads
# TFRecord, which needs it).
FILE_FORMAT = "array_record"
PREPARE_COMMAND = "python -m adder.data --mnist-dir DIR --data-dir OUT"
# Where TFDS downloads MNIST from (tensorflow_datasets/image_classification/mnist.py).
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# Offline, TFDS retries its download for minutes; a probe this long says so first.
REACH_TIMEOUT_S = 5.0


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


def resolve_data_dir(data_dir: Optional[str]) -> str:
  """The TFDS data dir, absolute: the argument, else $TFDS_DATA_DIR, else TFDS's default."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(data_dir))


def can_reach(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
  """Whether a TCP connection to `url`'s host opens within `timeout` seconds.

  The name lookup counts towards the timeout (it runs in a thread, since a
  resolver can hang longer than any socket timeout). Where the environment
  names a proxy for the URL's scheme the answer is True: the proxy decides.
  """
  parts = urllib.parse.urlsplit(url)
  if urllib.request.getproxies().get(parts.scheme):
    return True
  port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 443)
  reached = threading.Event()

  def probe():
    try:
      with socket.create_connection((parts.hostname, port), timeout=timeout):
        reached.set()
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return reached.is_set()


def _import_tfds() -> Any:
  """tensorflow_datasets, once array_record (its ArrayRecord reader/writer) imports."""
  try:
    import array_record.python.array_record_data_source  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise DataError(
        f"array_record cannot be imported ({e}); adder reads MNIST through it: "
        "pip install array_record") from e
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"tensorflow-datasets cannot be imported ({e}): pip install tensorflow-datasets") from e
  return tfds


def _import_tensorflow_off_gpus() -> None:
  """Import TensorFlow for TFDS's preparation, keeping it off the GPUs JAX trains on.

  Raises:
    ImportError: TensorFlow is not installed.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass


def prepared_dir(data_dir: Optional[str] = None) -> Optional[str]:
  """The folder of MNIST prepared as ArrayRecord in `data_dir`, or None. No TensorFlow.

  Raises:
    DataError: MNIST is there in another format only (TFRecord, as
      ``tfds.load`` prepares it), which `read_mnist` cannot read.
  """
  data_dir = resolve_data_dir(data_dir)
  if not os.path.isdir(os.path.join(data_dir, DATASET)):
    return None
  tfds = _import_tfds()
  builder = tfds.builder(DATASET, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  formats = sorted(f.value for f in builder.info.available_file_formats())
  if FILE_FORMAT not in formats:
    raise DataError(
        f"{builder.data_dir} holds MNIST as {', '.join(formats)}, not {FILE_FORMAT}: "
        "delete that folder (it is then prepared again) or give another --data-dir")
  return str(builder.data_dir)


def prepare_mnist(mnist_dir: Optional[str] = None, data_dir: Optional[str] = None) -> str:
  """Prepare MNIST as an ArrayRecord TFDS dataset in `data_dir`; needs TensorFlow.

  Args:
    mnist_dir: folder with the four official IDX .gz files (TFDS manual
      directory); None uses $ADDER_MNIST_DIR, else lets TFDS download.
    data_dir: where to prepare it; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
      Downloads and extracted files go to a temporary folder, so `data_dir`
      receives only ``mnist/``.

  Returns:
    The prepared dataset's folder, ``data_dir/mnist/<version>``.

  Raises:
    DataError: no TensorFlow, or the files are missing, fail TFDS's checksums
      or cannot be fetched (without `mnist_dir`, their host is first checked
      to be reachable, see `can_reach`).
  """
  mnist_dir = resolve_mnist_dir(mnist_dir)
  data_dir = resolve_data_dir(data_dir)
  tfds = _import_tfds()
  try:
    _import_tensorflow_off_gpus()
  except ImportError as e:
    raise DataError(
        f"MNIST is not prepared in {data_dir}, and preparing it needs TensorFlow, "
        f"which cannot be imported here: run `{PREPARE_COMMAND}` on a machine with "
        f"TensorFlow, then copy the folder OUT/{DATASET} here as "
        f"{os.path.join(data_dir, DATASET)}") from e
  if mnist_dir is None and not can_reach(MNIST_URL):
    raise DataError(
        f"MNIST is not prepared in {data_dir}, and {urllib.parse.urlsplit(MNIST_URL).hostname} "
        f"cannot be reached to download it: pass --mnist-dir DIR (or set ${MNIST_DIR_ENV}) "
        f"naming a folder with the four official files ({', '.join(MNIST_FILES)})")
  builder = tfds.builder(DATASET, data_dir=data_dir, file_format=FILE_FORMAT)
  download_config = tfds.download.DownloadConfig(manual_dir=mnist_dir)
  with tempfile.TemporaryDirectory(prefix="adder-mnist-") as downloads:
    try:
      builder.download_and_prepare(download_dir=downloads, download_config=download_config)
    except Exception as e:  # TFDS raises many types; all mean "no dataset".
      where = mnist_dir or "the internet"
      first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise DataError(
          f"could not prepare MNIST from {where} ({type(e).__name__}: {first_line}); "
          f"give --mnist-dir (or ${MNIST_DIR_ENV}) a folder with the four official "
          "IDX .gz files") from e
  return str(builder.data_dir)


def decode_png(png: bytes) -> np.ndarray:
  """One MNIST PNG as uint8 (28, 28)."""
  return np.asarray(Image.open(io.BytesIO(png)), np.uint8).reshape(28, 28)


def read_mnist(data_dir: Optional[str] = None) -> dict[str, np.ndarray]:
  """MNIST prepared as ArrayRecord in `data_dir`, as host arrays; no TensorFlow.

  TFDS hands over each record's PNG bytes undecoded and Pillow decodes them:
  4 s for the 70,000 images on a 2-core CPU, against 6 s when TFDS decodes
  them itself (measured; its per-feature decoding is the slow part).

  Returns:
    ``train_images`` uint8 (60000, 28, 28), ``train_labels`` int32 (60000,),
    ``test_images`` uint8 (10000, 28, 28), ``test_labels`` int32 (10000,).

  Raises:
    DataError: no prepared dataset there, or its files cannot be read.
  """
  data_dir = resolve_data_dir(data_dir)
  version_dir = prepared_dir(data_dir)
  if version_dir is None:
    raise DataError(
        f"MNIST is not prepared in {data_dir}: run `{PREPARE_COMMAND}` and give OUT "
        "as --data-dir")
  tfds = _import_tfds()
  dataset = {}
  try:
    for split in SPLIT_SIZES:
      source = tfds.data_source(DATASET, split=split, data_dir=data_dir,
                                decoders={"image": tfds.decode.SkipDecoding()})
      records = source.__getitems__(range(len(source)))
      dataset[f"{split}_images"] = np.stack(
          [decode_png(r["image"]) for r in records]).reshape(-1, 28, 28)
      dataset[f"{split}_labels"] = np.array([r["label"] for r in records], np.int32)
  except Exception as e:  # a truncated or foreign file; say which folder
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise DataError(
        f"could not read MNIST from {version_dir} ({type(e).__name__}: {first_line}); "
        f"delete it and prepare it again (`{PREPARE_COMMAND}`)") from e
  return dataset


def load_mnist(
    mnist_dir: Optional[str] = None, data_dir: Optional[str] = None
) -> dict[str, np.ndarray]:
  """MNIST as host arrays: read from `data_dir`, prepared there first if absent.

  Reading needs no TensorFlow; preparing does (see `prepare_mnist`).

  Args:
    mnist_dir: folder with the four official IDX .gz files (TFDS manual
      directory); None uses $ADDER_MNIST_DIR, else lets TFDS download.
    data_dir: where the prepared dataset is kept; None: $TFDS_DATA_DIR or
      TFDS's default (~/tensorflow_datasets).

  Returns:
    ``train_images`` uint8 (60000, 28, 28), ``train_labels`` int32 (60000,),
    ``test_images`` uint8 (10000, 28, 28), ``test_labels`` int32 (10000,).

  Raises:
    DataError: the files are missing, fail TFDS's checksums or cannot be
      fetched; or preparing is needed and TensorFlow is absent.
  """
  mnist_dir = resolve_mnist_dir(mnist_dir)
  data_dir = resolve_data_dir(data_dir)
  if prepared_dir(data_dir) is None:
    prepare_mnist(mnist_dir, data_dir)
  return read_mnist(data_dir)


def check_mnist(dataset: dict[str, np.ndarray]) -> None:
  """Raise `DataError` unless `dataset` is the whole of MNIST as `load_mnist` gives it.

  Checks each split's count (60000 train, 10000 test), the dtypes and shapes
  (uint8 (N, 28, 28), int32 (N,)) and that the labels cover exactly 0..9.
  """
  for split, count in SPLIT_SIZES.items():
    images, labels = dataset[f"{split}_images"], dataset[f"{split}_labels"]
    problems = []
    if images.dtype != np.uint8 or images.shape != (count, 28, 28):
      problems.append(f"images {images.dtype} {images.shape}, not uint8 {(count, 28, 28)}")
    if labels.dtype != np.int32 or labels.shape != (count,):
      problems.append(f"labels {labels.dtype} {labels.shape}, not int32 {(count,)}")
    if set(np.unique(labels).tolist()) != set(range(10)):
      problems.append(f"labels {sorted(set(np.unique(labels).tolist()))}, not 0..9")
    if problems:
      raise DataError(f"{split} split: {'; '.join(problems)}")


def _folder_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m adder.data``: prepare (if needed), verify, and say what to copy."""
  p = argparse.ArgumentParser(
      prog="python -m adder.data",
      description="Prepare MNIST as an ArrayRecord TFDS dataset (this step needs "
                  "TensorFlow), read it back without TensorFlow, check it, and print "
                  "the folder to copy to a host that has no TensorFlow.")
  p.add_argument("--mnist-dir", default=None,
                 help="folder with the four official MNIST .gz files (default: "
                      f"${MNIST_DIR_ENV}, else TFDS downloads them)")
  p.add_argument("--data-dir", default=None,
                 help="where the prepared dataset is kept (default: $TFDS_DATA_DIR "
                      "or ~/tensorflow_datasets)")
  p.add_argument("--check-only", action="store_true",
                 help="only read and check a dataset already prepared; never prepare "
                      "(for a copied folder)")
  a = p.parse_args(argv)
  try:
    mnist_dir = resolve_mnist_dir(a.mnist_dir)
    data_dir = resolve_data_dir(a.data_dir)
    version_dir = prepared_dir(data_dir)
    if version_dir is None and a.check_only:
      raise DataError(f"MNIST is not prepared in {data_dir} (--check-only)")
    if version_dir is None:
      start = time.perf_counter()
      version_dir = prepare_mnist(mnist_dir, data_dir)
      print(f"prepared MNIST as {FILE_FORMAT} in {time.perf_counter() - start:.1f} s: "
            f"{version_dir}")
    else:
      print(f"found MNIST as {FILE_FORMAT}: {version_dir}")
    start = time.perf_counter()
    dataset = read_mnist(data_dir)
    seconds = time.perf_counter() - start
    check_mnist(dataset)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"read in {seconds:.1f} s (tfds.data_source, no TensorFlow needed): "
        + ", ".join(f"{split} {len(dataset[f'{split}_labels'])}" for split in SPLIT_SIZES)
        + " images uint8 (28, 28), int32 labels 0..9")
  folder = os.path.join(data_dir, DATASET)
  print(f"on disk: {folder}, {_folder_bytes(folder) / 1e6:.1f} MB. For a host without "
        f"TensorFlow, copy that folder there as DIR/{DATASET} and pass --data-dir DIR")
  return 0


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


if __name__ == "__main__":
  sys.exit(main())
