"""Markdown tables of a training run, for README.md and docs/, from its workdir.

Commands (what produced the results tables of README.md and docs/results.md,
the training-log excerpt of README.md, and the tables of docs/recipe-search.md):

  python experiments/report.py pretrained
  python experiments/report.py --console pretrained
  python experiments/report.py runs/seeds/0 runs/seeds/1 runs/seeds/2
  python experiments/report.py --by-recipe runs/sweep-a/x=1_seed{0,1,2} runs/sweep-a/x=2_seed{0,1,2}

With one workdir: the results table (final and SWA weights on the fixed test
pairs and the exhaustive set), the exhaustive set's joint accuracy for each
integer with the share of right sums among right digits, and the per-epoch
log. With several (runs of one recipe with different seeds): each run's joint
accuracies, then its exhaustive digit accuracy and share of right sums among
right digits (a misread image, or the adder part wrong), each with the mean
and standard deviation. With ``--by-recipe``: one row per recipe, the runs
grouped by their workdir's name less its ``_seed<N>`` suffix (the names
`experiments/sweep.py` gives), with the exhaustive set's joint accuracy per
seed and, as mean ± std, its joint and digit accuracy and the share of right
sums among right digits, each for the final / SWA weights. With ``--console``
(one workdir): the run's per-epoch and final lines as ``python -m adder.train``
prints them. Everything is read from ``results.json`` and ``metrics.jsonl``;
only the mean and deviation are computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adder import metrics  # noqa: E402  (numpy only)


def results_table(results: dict) -> str:
  rows = ["| weights | set | cases | digit acc | sum acc | joint acc | consistency |",
          "|---|---|---:|---:|---:|---:|---:|"]
  for weights in ("final", "swa"):
    if weights not in results:
      continue
    for split, cases in (("test", "10,000"), ("exhaustive", "100,000")):
      m = results[weights][split]
      consistency = f"{m['consistency']:.2%}" if "consistency" in m else ""
      rows.append(f"| {weights} | {split} | {cases} | {m['digit_acc']:.2%} | "
                  f"{m['sum_acc']:.2%} | {m['joint_acc']:.2%} | {consistency} |")
  c = results["config"]
  rows.append("")
  rows.append(f"{results['params']:,} parameters; {c['epochs']} epochs, batch "
              f"{c['batch_size']}, peak lr {c['lr']}, seed {c['seed']}; backend "
              f"`{results['backend']}` ({results.get('device_kind', '?')}) x "
              f"{results['devices']}; {results['train_seconds']:.0f} s of training; "
              f"jax {results['versions']['jax']}, flax {results['versions']['flax']}, "
              f"optax {results['versions']['optax']}.")
  return "\n".join(rows)


def by_number_table(results: dict) -> str:
  """Exhaustive-set joint accuracy per integer 0..9, and sum right given digit right."""
  rows = ["| weights | " + " | ".join(f"+{k}" for k in range(10)) + " | sum right, digit right |",
          "|---|" + "---:|" * 11]
  for weights in ("final", "swa"):
    m = results.get(weights, {}).get("exhaustive", {})
    if "joint_acc_by_number" not in m:
      continue
    rows.append(f"| {weights} | " + " | ".join(f"{a:.2%}" for a in m["joint_acc_by_number"])
                + f" | {m['sum_given_digit']:.3%} |")
  return "\n".join(rows) if len(rows) > 2 else ""


SEED_COLUMNS = (("final", "test"), ("final", "exhaustive"), ("swa", "test"), ("swa", "exhaustive"))
# Where the joint errors come from, on the exhaustive set: the digit misread,
# or the digit read right and the sum wrong.
ADDER_COLUMNS = (("final", "digit_acc"), ("final", "sum_given_digit"),
                 ("swa", "digit_acc"), ("swa", "sum_given_digit"))


def _score(run: dict, weights: str, key: str, split: str = "exhaustive") -> float:
  """A run's `key` for its `weights` on `split`; NaN where the run has none."""
  return run[weights][split].get(key, float("nan")) if weights in run else float("nan")


def _per_seed_table(runs: list[dict], header: str, columns: list[list[float]]) -> str:
  """One row per run (its seed) of `columns`' values, then mean ± sample standard deviation."""
  rows = [f"| seed | {header} |", "|---:|" + "---:|" * len(columns[0])]
  for r, values in zip(runs, columns):
    rows.append(f"| {r['config']['seed']} | " + " | ".join(f"{v:.2%}" for v in values) + " |")
  cells = []
  for values in zip(*columns):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    cells.append(f"**{statistics.mean(values):.2%} ± {std:.2%}**")
  rows.append("| mean ± std | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def seeds_table(runs: list[dict]) -> str:
  """Each run's joint accuracies (final and SWA, test pairs and exhaustive set), mean ± std."""
  columns = [[_score(r, w, "joint_acc", split) for w, split in SEED_COLUMNS] for r in runs]
  return _per_seed_table(runs, "final test joint | final exhaustive joint | SWA test joint | "
                         "SWA exhaustive joint", columns)


def adder_table(runs: list[dict]) -> str:
  """Each run's exhaustive digit accuracy and sum right given digit right, mean ± std."""
  columns = [[_score(r, w, k) for w, k in ADDER_COLUMNS] for r in runs]
  return _per_seed_table(runs, "final digit | final sum right, digit right | SWA digit | "
                         "SWA sum right, digit right", columns)


def recipe_name(workdir: str) -> str:
  """A run's recipe: its workdir's name less a ``_seed<N>`` suffix."""
  return re.sub(r"_seed\d+$", "", os.path.basename(os.path.normpath(workdir)))


def _pair(values: list[list[float]]) -> str:
  """'final / swa' in points: each list's mean, with ± its sample std if it has several."""
  def cell(v):
    if len(v) == 1:
      return f"{100 * v[0]:.2f}"
    return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}"
  return " / ".join(cell(v) for v in values)


def recipes_table(workdirs: list[str], runs: list[dict]) -> str:
  """One row per recipe (`recipe_name`), in order of first appearance, over its seeds.

  Exhaustive set, final / SWA weights: joint accuracy per seed, then mean ±
  sample std (a recipe of one run: its figures) of joint accuracy, digit
  accuracy and sum right given digit right.
  """
  groups: dict[str, list[dict]] = {}
  for workdir, r in zip(workdirs, runs):
    groups.setdefault(recipe_name(workdir), []).append(r)
  rows = ["| run | seeds | joint, per seed | joint | digit | sum right, digit right |",
          "|---|---|---|---|---|---|"]
  for name, group in groups.items():
    joint = _exhaustive(group, "joint_acc")
    per_seed = ", ".join(_pair([[f], [s]]) for f, s in zip(*joint))
    seeds = ", ".join(str(r["config"]["seed"]) for r in group)
    rows.append(f"| {name} | {seeds} | {per_seed} | {_pair(joint)} | "
                f"{_pair(_exhaustive(group, 'digit_acc'))} | "
                f"{_pair(_exhaustive(group, 'sum_given_digit'))} |")
  return "\n".join(rows)


def _exhaustive(runs: list[dict], key: str) -> list[list[float]]:
  """[final, swa]: each run's exhaustive-set `key` for those weights (NaN where absent)."""
  return [[_score(r, w, key) for r in runs] for w in ("final", "swa")]


def log_table(rows: list[dict]) -> str:
  out = ["| epoch | train loss | test digit | test sum | test joint | lr | seconds |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['test_digit_acc']:.4f} | "
               f"{r['test_sum_acc']:.4f} | {r['test_joint_acc']:.4f} | {r['lr']:.5f} | "
               f"{r['seconds']:.2f} |")
  return "\n".join(out)


def console_lines(results: dict, rows: list[dict]) -> list[str]:
  """The per-epoch and final lines of a run, as ``python -m adder.train`` prints them.

  Args:
    results: the run's ``results.json``; rows: its ``metrics.jsonl``, one dict per epoch.
  """
  epochs = results["config"]["epochs"]
  return ([metrics.epoch_line(r, epochs) for r in rows]
          + [metrics.final_line(name, results[name]["test"], results[name]["exhaustive"])
             for name in ("final", "swa") if name in results])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Markdown tables of training runs.")
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  p.add_argument("--by-recipe", action="store_true",
                 help="one row per recipe (workdir name less _seed<N>), over its seeds")
  p.add_argument("--console", action="store_true",
                 help="one run's per-epoch and final lines, as python -m adder.train prints them")
  a = p.parse_args(argv)
  if a.console and len(a.workdirs) != 1:
    print("error: --console takes one workdir", file=sys.stderr)
    return 2
  runs, logs = [], []
  for workdir in a.workdirs:
    try:
      with open(os.path.join(workdir, "results.json")) as f:
        runs.append(json.load(f))
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logs.append([json.loads(line) for line in f if line.strip()])
    except (OSError, json.JSONDecodeError) as e:
      print(f"error: cannot read the run in {workdir}: {e}", file=sys.stderr)
      return 2
  if a.console:
    print("\n".join(console_lines(runs[0], logs[0])))
    return 0
  if a.by_recipe:
    print(recipes_table(a.workdirs, runs))
    return 0
  if len(runs) > 1:
    print(seeds_table(runs))
    print()
    print(adder_table(runs))
    return 0
  print(results_table(runs[0]))
  by_number = by_number_table(runs[0])
  if by_number:
    print()
    print(by_number)
  print()
  print(log_table(logs[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
