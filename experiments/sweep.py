"""Full runs of the recipe with some `Config` fields changed, to choose the defaults.

Commands (what produced the tables in docs/recipe-search.md):

  # augmentation strength
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds \
      --out runs/sweep-augment.md --workdirs runs/sweep-augment --grid \
      augment_shift_px=2,augment_rotate_deg=10 augment_shift_px=0,augment_rotate_deg=0 \
      augment_shift_px=1,augment_rotate_deg=5

  # peak learning rate, weight decay and batch size, around the chosen augmentation
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds \
      --out runs/sweep-recipe.md --workdirs runs/sweep-recipe \
      --grid weight_decay=1e-4 lr=0.4 lr=0.1 batch_size=64

  # the last epochs without augmentation, and stronger transforms before them, 3 seeds each
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds --seeds 0 1 2 \
      --out runs/sweep-plain.md --workdirs runs/sweep-plain --grid plain_last_epochs=3
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds --seeds 0 1 2 \
      --out runs/sweep-strong.md --workdirs runs/sweep-strong \
      --grid augment_shift_px=2,augment_rotate_deg=10,plain_last_epochs=5

  # weight decay, a constant-rate SWA phase, and augmentation strengths (the
  # default of the time: +-1 px, +-5 degrees, no scaling); the last became the default
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds --seeds 0 1 \
      --out runs/sweep-swalr.md --workdirs runs/sweep-swalr --grid swa_lr=0.02 swa_lr=0.05
  python experiments/sweep.py --epochs 20 --data-dir .data/tfds --seeds 1 2 \
      --out runs/sweep-scale.md --workdirs runs/sweep-scale \
      --grid augment_scale=0.1 augment_rotate_deg=10,augment_scale=0.1
  (and the others in docs/recipe-search.md)

  # the peak learning rate (3-epoch runs without SWA, before augmentation)
  python experiments/sweep.py --epochs 3 --no-swa --mnist-dir ../shared/mnist \
      --grid 128:0.05 128:0.1 128:0.2 --out runs/sweep.md

Each grid item is one run per seed: ``FIELD=VALUE[,FIELD=VALUE...]``
overrides of the default `Config` (``BATCH:LR`` is short for
``batch_size=BATCH,lr=LR``; a tuple's items are joined by ``x``, as in
``conv_features=16x16x24x24x20``). The table gives each run's accuracies on the
fixed test pairs and the exhaustive set, for the final weights and, with SWA,
the averaged ones. With several ``--seeds``, a second table gives each item's
exhaustive joint accuracy as the mean ± sample standard deviation over them.
With ``--workdirs``, each run keeps its workdir (checkpoint, results,
metrics, plots) in a subfolder named after its grid item (and seed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import typing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adder import data as data_lib  # pylint: disable=g-import-not-at-top
from adder import devices
from adder import train as train_lib
from adder.config import Config

# Each field's type, annotations resolved: Optional[float] is Union[float, None].
_TYPES = typing.get_type_hints(Config)


def parse_item(item: str, base: Config) -> Config:
  """``FIELD=VALUE,...`` (or ``BATCH:LR``) -> `base` with those fields replaced.

  Raises:
    ValueError: an unknown field or a value of the wrong type.
  """
  if "=" not in item and ":" in item:
    batch, lr = item.split(":")
    item = f"batch_size={batch},lr={lr}"
  changes = {}
  for pair in item.split(","):
    name, _, value = pair.partition("=")
    if name not in _TYPES or not value:
      raise ValueError(f"{pair!r} is not FIELD=VALUE with a field of Config")
    changes[name] = _parse_value(_TYPES[name], value)
  return base.replace(**changes)


def _parse_value(kind, value: str):
  """`value` as a field of type `kind`; ``none`` for an Optional field's None.

  A tuple field takes its items joined by ``x``: ``conv_features=16x16x24x24x20``
  (a grid item's fields are already separated by commas, and its name becomes
  a folder's).
  """
  if typing.get_origin(kind) is typing.Union:  # Optional[X]
    if value.lower() == "none":
      return None
    (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
  if typing.get_origin(kind) is tuple:  # tuple[int, ...]
    item = typing.get_args(kind)[0]
    return tuple(item(v) for v in value.split("x"))
  return (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)


def table_row(item: str, results: dict) -> str:
  """One markdown row: the item, then joint accuracies (test, exhaustive) per weight set."""
  cells = [item]
  for name in ("final", "swa"):
    r = results.get(name)
    cells += ([f"{r['test']['joint_acc']:.4f}", f"{r['exhaustive']['joint_acc']:.4f}"]
              if r else ["", ""])
  c = results["config"]
  img_s = c["epochs"] * (60000 // c["batch_size"]) * c["batch_size"] / results["train_seconds"]
  return "| " + " | ".join(cells) + f" | {img_s:.0f} |"


def mean_row(item: str, runs: list[dict]) -> str:
  """One markdown row: the item, its seeds, then exhaustive joint mean ± std per weight set."""
  cells = [item, ",".join(str(r["config"]["seed"]) for r in runs)]
  for name in ("final", "swa"):
    accs = [r[name]["exhaustive"]["joint_acc"] for r in runs if name in r]
    cells.append(f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}"
                 if len(accs) > 1 else "")
  return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--grid", nargs="+", required=True,
                 help="runs, each FIELD=VALUE[,FIELD=VALUE...] or BATCH:LR")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="run each item with each of these seeds (instead of --seed)")
  p.add_argument("--no-swa", action="store_true", help="every run without SWA")
  p.add_argument("--mnist-dir", default=None)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--workdirs", default=None,
                 help="keep each run's workdir (with its checkpoint) under this folder")
  p.add_argument("--out", default=None, help="also write the table to this file")
  a = p.parse_args(argv)
  seeds = a.seeds or [a.seed]
  base = Config(epochs=a.epochs, seed=seeds[0], swa=not a.no_swa)
  try:
    configs = [parse_item(item, base) for item in a.grid]
    # The CPU devices of `python -m adder.train`, chosen for the first run's batch.
    print(devices.configure_cpu_devices(configs[0].batch_size), flush=True)
    dataset = data_lib.load_mnist(a.mnist_dir, a.data_dir)
  except (ValueError, data_lib.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = [f"epochs={a.epochs} seed={','.join(map(str, seeds))}, each row the default "
          "Config with these fields:",
          "",
          "| run | final test joint | final exhaustive joint | SWA test joint | "
          "SWA exhaustive joint | img/s |",
          "|---|---:|---:|---:|---:|---:|"]
  means = ["", "Exhaustive joint accuracy, mean ± sample std over the seeds:", "",
           "| run | seeds | final | SWA |", "|---|---|---:|---:|"]
  for item, config in zip(a.grid, configs):
    runs = []
    for seed in seeds:
      name = item.replace(",", "_") + (f"_seed{seed}" if len(seeds) > 1 else "")
      with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(a.workdirs, name) if a.workdirs else tmp
        runs.append(train_lib.train_and_evaluate(config.replace(seed=seed), workdir,
                                                 dataset=dataset,
                                                 write_artifacts=bool(a.workdirs)))
      rows.append(table_row(item if len(seeds) == 1 else f"{item} seed={seed}", runs[-1]))
      print("\n".join(rows), flush=True)
      if a.out:  # after every row: a long sweep stopped early keeps what it measured
        with open(a.out, "w") as f:
          f.write("\n".join(rows + (means if len(seeds) > 1 else [])) + "\n")
    if len(seeds) > 1:
      means.append(mean_row(item, runs))
      print("\n".join(means), flush=True)
      if a.out:
        with open(a.out, "w") as f:
          f.write("\n".join(rows + means) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
