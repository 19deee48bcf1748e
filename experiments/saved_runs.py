"""What the scripts that score saved runs share: their command line and the data.

`experiments/batch_stats.py` and `experiments/hard_images.py` take training
workdirs and MNIST's location, check every workdir before the data loads, and
score each checkpoint on the test images.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import checkpoint  # pylint: disable=g-import-not-at-top
from adder import config as config_lib
from adder import data as data_lib


def parser(description: str) -> argparse.ArgumentParser:
  """A parser of ``WORKDIR...`` plus ``--mnist-dir`` and ``--data-dir``."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("workdirs", nargs="+", help="training workdirs (or checkpoint folders)")
  config_lib.add_data_flags(p)
  return p


def dataset(args: argparse.Namespace) -> dict:
  """MNIST, once every workdir of `args` is found to hold a checkpoint.

  Raises:
    checkpoint.CheckpointError: a workdir without one. data_lib.DataError: no MNIST.
  """
  for workdir in args.workdirs:
    checkpoint.find(workdir)
  return data_lib.load_mnist(args.mnist_dir, args.data_dir)
