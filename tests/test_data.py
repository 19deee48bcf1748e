"""The data pipeline: TFDS loading, on-device pairs, evaluation sets."""


import numpy as np
import pytest
import tensorflow_datasets as tfds

from adder import data as data_lib

KEY_SEED = 7


def _plan(epoch, seed=KEY_SEED, n=1000, batch=100):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(a) for a in data_lib.epoch_plan(jax.random.PRNGKey(seed), epoch, n, batch)]


def test_epoch_plan_shapes_and_permutation():
  indices, numbers = _plan(0, n=1050, batch=100)
  assert indices.shape == numbers.shape == (10, 100)
  assert indices.dtype == numbers.dtype == np.int32
  # Each image at most once per epoch; 50 left over for a later shuffle.
  assert len(np.unique(indices)) == 1000 and indices.min() >= 0 and indices.max() < 1050
  assert numbers.min() >= 0 and numbers.max() <= 9


def test_epoch_plan_is_deterministic_given_seed_and_epoch():
  for a, b in zip(_plan(3), _plan(3)):
    np.testing.assert_array_equal(a, b)
  other_seed = _plan(3, seed=KEY_SEED + 1)
  assert not np.array_equal(_plan(3)[1], other_seed[1])


def test_fresh_integers_and_order_each_epoch():
  (i0, n0), (i1, n1) = _plan(0), _plan(1)
  assert not np.array_equal(i0, i1)
  # The same image gets a different integer in another epoch about 90% of the time.
  by_image0 = np.empty(1000, np.int32); by_image0[i0.ravel()] = n0.ravel()
  by_image1 = np.empty(1000, np.int32); by_image1[i1.ravel()] = n1.ravel()
  assert 0.8 < np.mean(by_image0 != by_image1) < 0.97


def test_integers_are_uniform_chi_square():
  _, numbers = _plan(0, n=60000, batch=600)
  counts = np.bincount(numbers.ravel(), minlength=10)
  expected = numbers.size / 10
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # 9 degrees of freedom: P(chi2 > 27.88) = 0.001.
  assert chi2 < 27.88, (chi2, counts)


def test_exhaustive_pairs_are_each_image_times_each_integer():
  image_index, numbers = data_lib.exhaustive_pairs(7)
  assert image_index.shape == numbers.shape == (70,)
  pairs = set(zip(image_index.tolist(), numbers.tolist()))
  assert pairs == {(i, k) for i in range(7) for k in range(10)}


def test_test_numbers_fixed_by_seed():
  a, b = data_lib.test_numbers(500, 1), data_lib.test_numbers(500, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, data_lib.test_numbers(500, 2))
  assert a.min() >= 0 and a.max() <= 9


def test_load_mnist_through_tfds(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    d = data_lib.load_mnist(None, str(tmp_path))
  assert d["train_images"].shape[1:] == (28, 28) and d["train_images"].dtype == np.uint8
  assert d["test_images"].shape[1:] == (28, 28)
  assert d["train_labels"].dtype == np.int32
  assert len(d["train_images"]) == len(d["train_labels"]) == 12


def test_missing_files_give_a_clear_error(tmp_path):
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(data_lib.DataError, match="lacks train-labels"):
    data_lib.load_mnist(str(tmp_path), str(tmp_path / "prepared"))


def test_corrupt_files_fail_tfds_checksums(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in data_lib.MNIST_FILES:
    (manual / name).write_bytes(b"not mnist")
  with pytest.raises(data_lib.DataError, match="could not prepare MNIST"):
    data_lib.load_mnist(str(manual), str(tmp_path / "prepared"))


def test_env_variable_names_the_folder(tmp_path, monkeypatch):
  monkeypatch.setenv(data_lib.MNIST_DIR_ENV, str(tmp_path))
  with pytest.raises(data_lib.DataError, match=str(tmp_path)):
    data_lib.resolve_mnist_dir(None)
  monkeypatch.delenv(data_lib.MNIST_DIR_ENV)
  assert data_lib.resolve_mnist_dir(None) is None
