"""The figures of a finished training run, redrawn from its workdir.

Command (from the repository root; what produced docs/figures/loss.png,
accuracy.png, lr.png, samples.png, mistakes.png and confusion.png, from the
pretrained run; evaluation only, nothing is trained):

  python experiments/figures.py pretrained --out docs/figures   # MNIST as adder.train gets it

It printed the six paths, then ``swa weights; 44 of 10000 test pairs wrong``.

Reads ``metrics.jsonl`` (the curves) and ``checkpoint/`` (the preferred
weights, as `adder.predict` picks them: SWA where present), predicts the fixed
test pairs (`adder.data.test_numbers` with the run's ``eval_seed``) and writes
the PNGs of `adder.plots.write_all` into ``--out``, their titles naming the
weights: the same figures ``adder.train`` writes into its workdir, plus any
that were added since the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from adder import checkpoint as checkpoint_lib  # noqa: E402
from adder import data as data_lib  # noqa: E402
from adder import plots  # noqa: E402
from adder import predict  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python experiments/figures.py", description=__doc__.split("\n")[0])
  p.add_argument("workdir", help="a finished run of python -m adder.train")
  p.add_argument("--out", required=True, help="folder for the PNGs")
  p.add_argument("--mnist-dir", default=None, help="as for adder.train")
  p.add_argument("--data-dir", default=None, help="as for adder.train")
  a = p.parse_args(argv)
  try:
    model = predict.load(a.workdir)
    with open(os.path.join(a.workdir, "metrics.jsonl")) as f:
      history = [json.loads(line) for line in f if line.strip()]
    dataset = data_lib.load_mnist(a.mnist_dir, a.data_dir)
  except (checkpoint_lib.CheckpointError, data_lib.DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  images, labels = dataset["test_images"], dataset["test_labels"]
  numbers = data_lib.test_numbers(len(labels), model.config.eval_seed)
  digit_pred, sum_pred = model(images, numbers)
  for path in plots.write_all(a.out, history, images, labels, numbers, digit_pred, sum_pred,
                              weights=model.weights):
    print(path)
  print(f"{model.weights} weights; {len(plots.mistakes(labels, numbers, digit_pred, sum_pred))} "
        f"of {len(labels)} test pairs wrong")
  return 0


if __name__ == "__main__":
  sys.exit(main())
