"""Shared fixtures: a tiny learnable fake dataset and the real MNIST folder."""

import os
import pathlib

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
