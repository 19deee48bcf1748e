"""Short runs over batch size and peak learning rate, to choose the defaults.

Command (what produced the table in README.md):

  python experiments/sweep.py --epochs 3 --mnist-dir ../shared/mnist \\
      --grid 128:0.05 128:0.1 128:0.2 256:0.2 --out runs/sweep.md

Each run is a full one-cycle schedule over ``--epochs`` epochs with SWA off (the
averaging window of a short run says little); the table reports the test-set
accuracies of the final weights and the training throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import data as data_lib  # pylint: disable=g-import-not-at-top
from adder import train as train_lib
from adder.config import Config


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--grid", nargs="+", default=["128:0.05", "128:0.1", "128:0.2", "256:0.2"],
                 help="BATCH:LR pairs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mnist-dir", default=None)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out", default=None, help="also write the table to this file")
  a = p.parse_args(argv)
  try:
    dataset = data_lib.load_mnist(a.mnist_dir, a.data_dir)
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = ["| batch | peak lr | test digit | test sum | test joint | exhaustive joint | img/s |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
  for item in a.grid:
    bs, lr = item.split(":")
    config = Config(epochs=a.epochs, batch_size=int(bs), lr=float(lr), seed=a.seed, swa=False)
    with tempfile.TemporaryDirectory() as workdir:
      r = train_lib.train_and_evaluate(config, workdir, dataset=dataset, write_artifacts=False)
    t, ex = r["final"]["test"], r["final"]["exhaustive"]
    img_s = a.epochs * (60000 // config.batch_size) * config.batch_size / r["train_seconds"]
    rows.append(f"| {bs} | {lr} | {t['digit_acc']:.4f} | {t['sum_acc']:.4f} | "
                f"{t['joint_acc']:.4f} | {ex['joint_acc']:.4f} | {img_s:.0f} |")
    print("\n".join(rows), flush=True)
    if a.out:  # after every row: a long sweep stopped early keeps what it measured
      with open(a.out, "w") as f:
        f.write(f"epochs={a.epochs} seed={a.seed}\n\n" + "\n".join(rows) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
