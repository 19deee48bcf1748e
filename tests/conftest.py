"""Shared fixtures: a tiny learnable fake dataset and the tiny recipe that learns it,
the real MNIST folder, MNIST prepared once per session, and code that hides
packages from a subprocess."""

import functools
import json
import os
import pathlib
import textwrap

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "mnist"


def make_fake_mnist(num_train: int = 256, num_test: int = 64, seed: int = 0) -> dict:
  """Arrays shaped like `adder.data.load_mnist`'s, with a learnable digit.

  Each class is a fixed random blob pattern; each image is its class pattern
  plus noise, uint8 in [0, 255].
  """
  rng = np.random.default_rng(seed)
  patterns = rng.uniform(0, 255, (10, 28, 28)) * (rng.uniform(size=(10, 28, 28)) > 0.6)

  def split(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.normal(0, 30, (n, 28, 28))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels

  train_x, train_y = split(num_train)
  test_x, test_y = split(num_test)
  return {"train_images": train_x, "train_labels": train_y,
          "test_images": test_x, "test_labels": test_y}


@pytest.fixture(scope="session")
def fake_mnist() -> dict:
  return make_fake_mnist()


def real_mnist_dir():
  """The official MNIST files: $ADDER_MNIST_DIR, else ../shared/mnist, else None."""
  env = os.environ.get("ADDER_MNIST_DIR")
  if env:
    return env
  return str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None


@pytest.fixture(scope="session")
def prepared_mnist(tmp_path_factory) -> str:
  """A TFDS data dir holding the real MNIST prepared as ArrayRecord (about 20 s, once).

  Skipped, like the other real-data tests, when the official files are absent.
  """
  mnist_dir = real_mnist_dir()
  if mnist_dir is None:
    pytest.skip("the official MNIST files are not at ../shared/mnist or $ADDER_MNIST_DIR")
  from adder import data as data_lib  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  data_lib.prepare_mnist(mnist_dir, data_dir)
  return data_dir


def without_packages(*names: str) -> str:
  """Python code that makes the top-level packages `names` unimportable, as if not installed.

  Run it first in a subprocess (``python -c CODE + script``). Every finder on
  ``sys.meta_path`` is wrapped to find nothing for those names, so ``import``
  raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as
  on a host without them. (A finder that raised ImportError instead would also
  break ``find_spec``, which etils calls to probe for TensorFlow.)
  """
  return textwrap.dedent(f"""
      import sys

      class _Without:
        def __init__(self, finder):
          self._finder = finder

        def find_spec(self, name, path=None, target=None):
          if name.partition(".")[0] in {names!r}:
            return None
          return self._finder.find_spec(name, path, target)

        def __getattr__(self, attr):
          return getattr(self._finder, attr)

      sys.meta_path[:] = [_Without(f) for f in sys.meta_path]
      """)


# A tiny recipe that learns the fake data in three epochs, every epoch saved
# (the resume tests stop after any). Fake blob patterns are learnt in three
# short epochs only as they are, so TINY does not augment; TINY_AUGMENTED (the
# default bounds) checks that resuming draws the same transforms.
def _tiny_configs():
  from adder.config import Config  # pylint: disable=g-import-not-at-top
  tiny = Config(epochs=3, batch_size=32, lr=0.05, eval_batch_size=64, swa_start_frac=0.5,
                save_every_s=0.0).without_augmentation()
  d = Config()
  return tiny, tiny.replace(augment_shift_px=d.augment_shift_px,
                            augment_rotate_deg=d.augment_rotate_deg,
                            augment_scale=d.augment_scale)


TINY, TINY_AUGMENTED = _tiny_configs()


def metrics_rows(workdir) -> list:
  """The rows of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def short_run(fake_mnist, tmp_path_factory):
  """TINY trained on the fake data: ``(workdir, results)``."""
  from adder import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, train.train_and_evaluate(TINY, workdir, dataset=fake_mnist)


@pytest.fixture(scope="session")
def short_run_augmented(fake_mnist, tmp_path_factory):
  """TINY_AUGMENTED trained on the fake data: ``(workdir, results)``."""
  from adder import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run_augmented"))
  return workdir, train.train_and_evaluate(TINY_AUGMENTED, workdir, dataset=fake_mnist)


def random_variables(seed: int) -> dict:
  """Random weights of the default model, with BatchNorm statistics of random images (numpy).

  Drawn with numpy rather than `init_variables`: compiling JAX's random
  initialisers takes many seconds on a CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from adder import model as model_lib  # pylint: disable=g-import-not-at-top
  from adder.config import Config  # pylint: disable=g-import-not-at-top
  model = model_lib.create_model(Config())
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: model_lib.init_variables(model, key),
                          jax.ShapeDtypeStruct((2,), np.uint32))

  def draw(path, s):
    if len(s.shape) > 1:  # kernels: He normal
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    centre = 1.0 if path[-1].key == "scale" else 0.0
    return (centre + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  variables = {"params": jax.tree_util.tree_map_with_path(draw, shapes["params"])}
  images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
  numbers = rng.integers(0, 10, 64)
  # BatchNorm running statistics := those of this batch.
  _, updates = jax.jit(functools.partial(model.clone(bn_momentum=0.0).apply, train=True,
                                         mutable=["batch_stats"]))(
      {**variables, "batch_stats": jax.tree_util.tree_map(
          lambda s: np.ones(s.shape, s.dtype), shapes["batch_stats"])},
      model_lib.normalize_images(images), numbers)
  return jax.device_get({**variables, "batch_stats": updates["batch_stats"]})


@pytest.fixture(scope="session")
def weight_sets() -> dict:
  """Two random weight sets of the default model, ``final`` and ``swa``."""
  return {"final": random_variables(0), "swa": random_variables(1)}


@pytest.fixture(scope="session")
def checkpoint_workdir(tmp_path_factory, weight_sets) -> pathlib.Path:
  """A training workdir holding only ``checkpoint/``: `weight_sets` of the default config."""
  from adder import checkpoint  # pylint: disable=g-import-not-at-top
  from adder.config import Config  # pylint: disable=g-import-not-at-top
  wd = tmp_path_factory.mktemp("workdir")
  checkpoint.save(str(wd / "checkpoint"), weight_sets, Config())
  return wd


def garble_weights(ckpt_dir: pathlib.Path, pattern: str = "*") -> None:
  """Overwrite the weights' files matching `pattern` (not _METADATA) with garbage.

  ``"ocdbt.process_*/d/*"`` hits only array chunks, so that orbax fails while
  reading arrays (after reading the metadata); ``"*"`` also hits the OCDBT
  manifests and the zarr metadata.
  """
  paths = [p for p in (ckpt_dir / "weights").rglob(pattern)
           if p.is_file() and p.name not in ("_METADATA", "commit_success.txt")]
  assert paths, f"no {pattern} in the checkpoint: orbax's layout changed, update this test"
  for path in paths:
    path.write_bytes(b"\xffnot tensorstore data\x00" * 4)
