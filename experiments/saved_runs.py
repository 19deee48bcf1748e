"""What the scripts that score saved runs share: their command line, the data,
and each run restored and scored on the exhaustive set.

`experiments/batch_stats.py` and `experiments/hard_images.py` take training
workdirs and MNIST's location, check every workdir before the data loads, and
score each checkpoint on the test images.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import checkpoint  # pylint: disable=g-import-not-at-top
from adder import config as config_lib
from adder import data as data_lib
from adder import train as train_lib


def parser(description: str) -> argparse.ArgumentParser:
  """A parser of ``WORKDIR...`` plus ``--mnist-dir`` and ``--data-dir``."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("workdirs", nargs="+", help="training workdirs (or checkpoint folders)")
  config_lib.add_flags(p, config_lib.DATA_FLAGS)
  return p


def dataset(args: argparse.Namespace) -> dict:
  """MNIST, once every workdir of `args` is found to hold a checkpoint.

  Raises:
    checkpoint.CheckpointError: a workdir without one. data_lib.DataError: no MNIST.
  """
  for workdir in args.workdirs:
    checkpoint.find(workdir)
  return data_lib.load_mnist(args.mnist_dir, args.data_dir)


def restore(workdir: str, dataset: dict) -> tuple[config_lib.Config, dict, train_lib.Setup]:
  """`workdir`'s config and weight sets (`adder.checkpoint.load`), and a `Setup` for them."""
  config, weight_sets = checkpoint.load(workdir)
  s, _ = train_lib.setup(config, dataset)
  return config, weight_sets, s


def on_exhaustive(s: train_lib.Setup, variables: dict) -> tuple[dict[str, Any], tuple]:
  """`Setup.evaluate` of `variables` on the exhaustive set: (scores, (digit_pred, sum_pred)).

  The predictions are int32 (N * 10,); case ``10 * i + k`` is image i with integer k.
  """
  image_index, numbers = data_lib.exhaustive_pairs(s.test_y.shape[0])
  return s.evaluate(variables, image_index=image_index, numbers=numbers)
