"""Which test images saved runs misread, and how many of them every run misreads.

Command (what produced the table and figure in docs/results.md, "Hard images"):

  P=runs/sweep-plainbn
  python experiments/hard_images.py --data-dir .data/tfds --gallery docs/figures/hard_images.png \
      $P/plain_batch_stats=true_seed{0,1,2,3,4,5} $P/augment_rotate_deg=15_seed{0,1,2,3,4,5}

Each workdir's checkpoint (`adder.checkpoint.load`) is scored on the
exhaustive set (every test image with every integer) with its SWA weights
(``--weights final``: its final ones), as training scored it. A run misreads
an image when its digit head is wrong for at least one of the image's ten
cases. The table counts the test images by how many of the runs misread
them: if the runs shared no hard images, few would be misread by all; if
their errors are one fixed set of hard images, most would be. The indices of
the images every run misreads follow the table; ``--gallery PNG`` draws them,
each with its label and the wrong digit the runs read most often.
"""

from __future__ import annotations

import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import checkpoint  # pylint: disable=g-import-not-at-top
from adder import data as data_lib
from adder import plots
import saved_runs  # pylint: disable=g-bad-import-order


def digit_readings(workdir: str, dataset: dict, weights: str = "swa") -> np.ndarray:
  """int32 (N, 10): the digit `workdir`'s `weights` read in test image i with integer k."""
  _, weight_sets, s = saved_runs.restore(workdir, dataset)
  if weights not in weight_sets:
    raise checkpoint.CheckpointError(f"{workdir} has no {weights} weights")
  _, (digit_pred, _) = saved_runs.on_exhaustive(s, weight_sets[weights])
  return np.asarray(digit_pred).reshape(s.test_y.shape[0], 10)


def misread(readings: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """bool (..., N): the images read wrong for any integer; readings (..., N, 10)."""
  return (readings != np.asarray(labels)[:, None]).any(axis=-1)


def most_read_wrong(readings: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """int (N,): each image's most frequent wrong digit over runs and integers.

  Args: readings int (runs, N, 10); labels int (N,). An image never read
  wrong gets its label.
  """
  labels = np.asarray(labels)
  counts = np.stack([(readings == d).sum(axis=(0, 2)) for d in range(10)], axis=1)  # (N, 10)
  counts[np.arange(len(labels)), labels] = -1
  wrong = counts.argmax(axis=1)
  return np.where(counts.max(axis=1) > 0, wrong, labels)


def table(wrong: np.ndarray) -> str:
  """Images by how many of the runs misread them; `wrong` is bool (runs, N)."""
  runs = wrong.shape[0]
  times = wrong.sum(axis=0)
  rows = ["| misread by | images | share of a run's misread images |", "|---|---:|---:|"]
  per_run = wrong.sum(axis=1)
  for k in range(runs, 0, -1):
    images = int((times == k).sum())
    # Each image misread by k runs is k of the runs' misread images.
    share = k * images / per_run.sum() if per_run.sum() else 0.0
    rows.append(f"| {k} of {runs} runs | {images} | {share:.0%} |")
  rows.append(f"| any run | {int((times > 0).sum())} | |")
  rows.append("")
  rows.append(f"Misread by one run: {statistics.mean(per_run.tolist()):.1f} images on the mean "
              f"({int(per_run.min())} to {int(per_run.max())}).")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = saved_runs.parser(__doc__.split("\n\n", 1)[0])
  p.add_argument("--weights", choices=("swa", "final"), default="swa",
                 help="which weights of each run (default: %(default)s)")
  p.add_argument("--gallery", metavar="PNG",
                 help="draw the images that every run misreads into this file")
  a = p.parse_args(argv)
  if a.gallery and not os.path.isdir(os.path.dirname(os.path.abspath(a.gallery))):
    p.error(f"--gallery: no folder {os.path.dirname(os.path.abspath(a.gallery))}")
  try:
    dataset = saved_runs.dataset(a)
    labels = dataset["test_labels"]
    runs = []
    for workdir in a.workdirs:
      runs.append(digit_readings(workdir, dataset, a.weights))
      print(f"{workdir}: {int(misread(runs[-1], labels).sum())} images misread",
            file=sys.stderr, flush=True)
  except (checkpoint.CheckpointError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  runs = np.stack(runs)
  wrong = misread(runs, labels)
  print(table(wrong))
  print()
  hard = np.flatnonzero(wrong.all(axis=0))
  print("Misread by every run: " + " ".join(f"#{i}" for i in hard))
  if a.gallery:
    read = most_read_wrong(runs, labels)
    titles = [f"#{i}\nlabel {labels[i]}, read {read[i]}" for i in hard]
    plots.plot_gallery(dataset["test_images"], hard, titles,
                       f"Test images misread by all {len(runs)} runs: the label, and the "
                       "wrong digit read most often", a.gallery)
  return 0


if __name__ == "__main__":
  sys.exit(main())
