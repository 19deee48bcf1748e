"""The data pipeline: preparing and reading MNIST, on-device pairs, evaluation sets."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from adder import data as data_lib
from conftest import REPO, without_packages

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


# The first labels and the pixel sums of the prepared MNIST, as tfds.data_source
# reads it. The former path (tfds.load of a TFRecord preparation) gave equal
# arrays, checked element by element when the reading changed; a change here
# means the order or the decoding changed.
FIRST_TRAIN_LABELS = [4, 1, 0, 7, 8, 1, 2, 7, 1, 6, 6, 4]
FIRST_TEST_LABELS = [2, 0, 4, 8, 7, 6, 0, 6, 3, 1, 8, 0]
PIXEL_SUMS = {"train_images": 1_567_298_545, "test_images": 264_923_200}


def _python(code: str, *argv: str, hide: tuple[str, ...] = ()):
  """``python -c CODE ARGV`` from the repository root, as if packages `hide` were not installed."""
  prelude = without_packages(*hide) if hide else ""
  return subprocess.run([sys.executable, "-c", prelude + code, *argv], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def _module(name: str, *argv: str, hide: tuple[str, ...] = ()):
  """``python -m NAME ARGV``, as `_python` runs it."""
  return _python(f"import runpy; runpy.run_module({name!r}, run_name='__main__', alter_sys=True)",
                 *argv, hide=hide)


def _one_error_line(r) -> str:
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, r.stderr
  return errors[0]


def test_prepared_mnist_is_read_whole_and_in_order(prepared_mnist):
  version_dir = data_lib.prepared_dir(prepared_mnist)
  files = os.listdir(version_dir)
  assert any(".array_record-" in f for f in files), files
  assert not any(".tfrecord-" in f for f in files), files
  assert sorted(os.listdir(prepared_mnist)) == ["mnist"]  # downloads went elsewhere
  d = data_lib.load_mnist(None, prepared_mnist)
  data_lib.check_mnist(d)
  assert d["train_labels"][:12].tolist() == FIRST_TRAIN_LABELS
  assert d["test_labels"][:12].tolist() == FIRST_TEST_LABELS
  for key, total in PIXEL_SUMS.items():
    assert int(d[key].sum(dtype=np.int64)) == total, key


def test_check_mnist_names_what_is_wrong():
  def split(n, labels=10):
    return np.zeros((n, 28, 28), np.uint8), np.arange(n, dtype=np.int32) % labels
  (tx, ty), (vx, vy) = split(60_000), split(10_000)
  data_lib.check_mnist({"train_images": tx, "train_labels": ty,
                        "test_images": vx, "test_labels": vy})
  with pytest.raises(data_lib.DataError, match=r"test split: images uint8 \(12, 28, 28\)"):
    data_lib.check_mnist({"train_images": tx, "train_labels": ty,
                          "test_images": vx[:12], "test_labels": vy})
  with pytest.raises(data_lib.DataError, match=r"train split: labels int64"):
    data_lib.check_mnist({"train_images": tx, "train_labels": ty.astype(np.int64),
                          "test_images": vx, "test_labels": vy})
  with pytest.raises(data_lib.DataError, match=r"labels \[0, 1, 2\], not 0..9"):
    data_lib.check_mnist({"train_images": tx, "train_labels": split(60_000, 3)[1],
                          "test_images": vx, "test_labels": vy})


WITHOUT_TENSORFLOW_ONE_STEP = """
import sys
import jax
import numpy as np
from adder import data as data_lib
from adder import step as step_lib
from adder.config import Config

dataset = data_lib.load_mnist(data_dir=sys.argv[1])
config = Config(batch_size=8, epochs=1)
state, _ = step_lib.create_train_state(config, jax.random.PRNGKey(0), steps_per_epoch=8)
indices, numbers = data_lib.epoch_plan(jax.random.PRNGKey(0), 0, 64, 8)
state, metrics = jax.jit(step_lib.train_batch)(
    state, dataset["train_images"], dataset["train_labels"], indices[0], numbers[0])
assert int(state.step) == 1 and np.isfinite(float(metrics["loss"])), metrics
assert "tensorflow_datasets" in sys.modules and "array_record" in sys.modules
tensorflow = sorted(m for m in sys.modules if m.partition(".")[0] == "tensorflow")
assert not tensorflow, tensorflow
print("trained one step without tensorflow:", len(dataset["train_labels"]), "images")
"""


def test_prepared_mnist_needs_no_tensorflow(prepared_mnist):
  r = _python(WITHOUT_TENSORFLOW_ONE_STEP, prepared_mnist, hide=("tensorflow",))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "trained one step without tensorflow: 60000 images" in r.stdout


def test_without_tensorflow_an_unprepared_dir_is_one_clear_line(tmp_path):
  r = _module("adder.train", "--epochs", "1", "--data-dir", str(tmp_path / "empty"),
              "--workdir", str(tmp_path / "run"), hide=("tensorflow",))
  error = _one_error_line(r)
  assert f"MNIST is not prepared in {tmp_path / 'empty'}" in error
  assert "needs TensorFlow" in error and f"`{data_lib.PREPARE_COMMAND}`" in error
  assert f"copy the folder OUT/mnist here as {tmp_path / 'empty' / 'mnist'}" in error


def test_without_array_record_is_one_clear_line(tmp_path):
  r = _module("adder.data", "--data-dir", str(tmp_path), hide=("array_record",))
  assert "array_record cannot be imported" in _one_error_line(r)


def test_data_cli_verifies_and_says_what_to_copy(prepared_mnist, capsys):
  assert data_lib.main(["--data-dir", prepared_mnist]) == 0
  out = capsys.readouterr().out
  assert f"found MNIST as array_record: {prepared_mnist}/mnist/3.0.1" in out
  assert "train 60000, test 10000 images uint8 (28, 28), int32 labels 0..9" in out
  assert f"on disk: {prepared_mnist}/mnist, " in out and " MB." in out


def test_data_cli_check_only_never_prepares(tmp_path, capsys):
  assert data_lib.main(["--data-dir", str(tmp_path / "copy"), "--check-only"]) == 2
  assert "MNIST is not prepared in" in capsys.readouterr().err
  assert not (tmp_path / "copy").exists()


def test_data_cli_bad_folder_is_one_error_line(tmp_path):
  r = _module("adder.data", "--mnist-dir", str(tmp_path / "nowhere"),
              "--data-dir", str(tmp_path / "out"))
  assert "lacks train-images" in _one_error_line(r)


def test_tfrecord_preparation_is_refused_with_advice(prepared_mnist, tmp_path):
  shutil.copytree(os.path.join(prepared_mnist, "mnist"), tmp_path / "mnist")
  info_path = tmp_path / "mnist" / "3.0.1" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(data_lib.DataError, match="holds MNIST as tfrecord, not array_record"):
    data_lib.load_mnist(None, str(tmp_path))


def test_corrupt_prepared_files_give_a_clear_error(prepared_mnist, tmp_path):
  shutil.copytree(os.path.join(prepared_mnist, "mnist"), tmp_path / "mnist")
  (shard,) = (tmp_path / "mnist" / "3.0.1").glob("mnist-test.array_record-*")
  shard.write_bytes(shard.read_bytes()[:1_000_000])
  with pytest.raises(data_lib.DataError, match="could not read MNIST from .*prepare it again"):
    data_lib.read_mnist(str(tmp_path))


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


def test_can_reach_a_listening_port_and_not_a_closed_one():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert data_lib.can_reach(f"http://127.0.0.1:{port}/", timeout=5)
  assert not data_lib.can_reach(f"http://127.0.0.1:{port}/", timeout=5)  # closed now


# Offline: every TCP connection fails, as without a network.
_OFFLINE = """
import socket
def _offline(*args, **kwargs):
  raise OSError("network is unreachable")
socket.create_connection = _offline
"""


def test_offline_without_mnist_files_fails_fast_and_says_how_to_pass_them(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k != data_lib.MNIST_DIR_ENV and not k.lower().endswith("_proxy")}
  code = _OFFLINE + "import runpy; runpy.run_module('adder.train', run_name='__main__')"
  start = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", code, "--epochs", "1", "--data-dir",
                      str(tmp_path / "empty"), "--workdir", str(tmp_path / "run")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  seconds = time.perf_counter() - start
  error = _one_error_line(r)
  assert "storage.googleapis.com cannot be reached" in error
  assert "--mnist-dir DIR" in error and "train-images-idx3-ubyte.gz" in error
  assert seconds < 60, f"took {seconds:.0f} s"  # JAX and TensorFlow start-up, no retries


def test_env_variable_names_the_folder(tmp_path, monkeypatch):
  monkeypatch.setenv(data_lib.MNIST_DIR_ENV, str(tmp_path))
  with pytest.raises(data_lib.DataError, match=str(tmp_path)):
    data_lib.resolve_mnist_dir(None)
  monkeypatch.delenv(data_lib.MNIST_DIR_ENV)
  assert data_lib.resolve_mnist_dir(None) is None
