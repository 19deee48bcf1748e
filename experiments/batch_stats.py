"""Saved runs' final weights, scored with their stored and with plain BatchNorm statistics.

Command (what produced the BatchNorm table in docs/recipe-search.md):

  python experiments/batch_stats.py --data-dir .data/tfds \
      runs/sweep-consistency/consistency_weight=1_seed{0,1,2} \
      runs/sweep-elastic/augment_elastic_px=0.5_seed{0,1,2} \
      runs/sweep-width/conv_features=16x20x20x20x20_hidden_features=40_seed{0,1,2} \
      runs/sweep-width/conv_features=16x32x16x16x20_hidden_features=40_seed{0,1,2}

Each workdir's checkpoint (`adder.checkpoint.load`) is scored on the
exhaustive set (every test image with every integer), joint accuracy:

* its ``final`` parameters with the BatchNorm statistics stored with them: the
  running statistics of the training batches, for a run saved with
  ``plain_batch_stats`` off or before that field existed;
* the same parameters with `adder.batch_norm.plain_batch_stats`, recomputed over
  the plain training images, as training does after augmented training;
* its ``swa`` weights, whose statistics were always recomputed so.

The last row gives the mean of each column and in how many runs the plain
statistics score higher, the same or lower than the stored ones. Nothing is
trained: a run takes one pass over the training images and three over the
exhaustive set.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import checkpoint  # pylint: disable=g-import-not-at-top
from adder import data as data_lib
import saved_runs  # pylint: disable=g-bad-import-order

COLUMNS = ("final, stored statistics", "final, plain statistics", "swa")


def scores(workdir: str, dataset: dict) -> dict[str, float]:
  """Exhaustive joint accuracy of `workdir`'s weight sets, keyed by `COLUMNS`."""
  _, weight_sets, s = saved_runs.restore(workdir, dataset)
  final = weight_sets["final"]
  sets = {COLUMNS[0]: final,
          COLUMNS[1]: {"params": final["params"],
                       "batch_stats": s.plain_batch_stats(final["params"])}}
  if "swa" in weight_sets:
    sets[COLUMNS[2]] = weight_sets["swa"]
  return {name: saved_runs.on_exhaustive(s, v)[0]["joint_acc"] for name, v in sets.items()}


def table(runs: dict[str, dict[str, float]]) -> str:
  """One row per run, then the column means and the count of gains, ties and losses."""
  rows = ["| run | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
  for name, score in runs.items():
    rows.append(f"| {name} | " + " | ".join(
        f"{score[c]:.2%}" if c in score else "" for c in COLUMNS) + " |")
  means = [statistics.mean(r[c] for r in runs.values() if c in r) for c in COLUMNS]
  diffs = [r[COLUMNS[1]] - r[COLUMNS[0]] for r in runs.values()]
  # Scores are counts of 100,000 cases: a difference below one case is a tie.
  ups, downs = sum(d > 5e-6 for d in diffs), sum(d < -5e-6 for d in diffs)
  rows.append(f"| mean of {len(runs)} runs (plain statistics: {ups} higher, "
              f"{len(runs) - ups - downs} the same, {downs} lower) | "
              + " | ".join(f"**{m:.2%}**" for m in means) + " |")
  return "\n".join(rows)


def main(argv=None) -> int:
  p = saved_runs.parser(__doc__.split("\n\n", 1)[0])
  a = p.parse_args(argv)
  try:
    dataset = saved_runs.dataset(a)
    runs = {}
    for workdir in a.workdirs:
      runs[os.path.basename(os.path.normpath(workdir))] = score = scores(workdir, dataset)
      print(f"{workdir}: " + ", ".join(f"{k} {v:.4f}" for k, v in score.items()),
            file=sys.stderr, flush=True)
  except (checkpoint.CheckpointError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(table(runs))
  return 0


if __name__ == "__main__":
  sys.exit(main())
