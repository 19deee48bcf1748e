"""Markdown tables of a training run, for README.md, from its workdir.

Command (what produced the "Results" and "Training logs" tables in README.md):

  python experiments/report.py runs/default

Prints the results table (final and SWA weights on the fixed test pairs and
the exhaustive set) and the per-epoch log, read from ``results.json`` and
``metrics.jsonl``; nothing is computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


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


def log_table(rows: list[dict]) -> str:
  out = ["| epoch | train loss | test digit | test sum | test joint | lr | seconds |",
         "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    out.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['test_digit_acc']:.4f} | "
               f"{r['test_sum_acc']:.4f} | {r['test_joint_acc']:.4f} | {r['lr']:.5f} | "
               f"{r['seconds']:.2f} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Markdown tables of a training run.")
  p.add_argument("workdir")
  a = p.parse_args(argv)
  try:
    with open(os.path.join(a.workdir, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(a.workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    print(f"error: cannot read the run in {a.workdir}: {e}", file=sys.stderr)
    return 2
  print(results_table(results))
  print()
  print(log_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
