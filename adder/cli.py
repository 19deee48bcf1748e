"""The command line of ``python -m adder.train``: flags -> `Config` -> `train_and_evaluate`.

The recipe's flags are `Config`'s own (`adder.config.add_flags`); this module
adds the run's (workdir, restart, several hosts), checks the config, and turns
every expected failure into one ``error:`` line on stderr:

* 0: trained and evaluated;
* 2: a bad flag or config, unreadable data, a workdir holding another run, a
  diverged loss;
* 1: in a run of several processes, the JAX runtime failed (most often
  another process stopped);
* 130 / 143: SIGINT / SIGTERM, after the epoch in progress was finished and
  saved (`adder.stopping`); a second signal stops at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import jax

from adder import checkpoint
from adder import config as config_lib
from adder import data as data_lib
from adder import devices
from adder import distributed
from adder import stopping
from adder import train
from adder.config import Config


def create_parser() -> argparse.ArgumentParser:
  """The parser of ``python -m adder.train``: `Config`'s flags plus the run's own."""
  p = argparse.ArgumentParser(
      prog="python -m adder.train",
      description="Train the MNIST adder (image + integer 0-9 -> digit, sum) and "
                  "evaluate it on fixed test pairs and the exhaustive set.")
  p.add_argument("--workdir", default="runs/default",
                 help="output folder: metrics.jsonl, results.json, checkpoint/, plots, "
                      "and state/, the training state of saved epochs; a run saved "
                      "there resumes (default: %(default)s)")
  p.add_argument("--restart", action="store_true",
                 help="delete the training state saved in the workdir and start over")
  config_lib.add_flags(p, config_lib.TRAIN_FLAGS)
  multi = p.add_argument_group(
      "several hosts", "one process per host; without these flags a SLURM / MPI "
      "launch or $JAX_COORDINATOR_ADDRESS is detected")
  multi.add_argument("--coordinator", default=None,
                     help="HOST:PORT of process 0, for jax.distributed.initialize")
  multi.add_argument("--num-processes", type=int, default=None, help="number of processes")
  multi.add_argument("--process-id", type=int, default=None, help="this process, 0-based")
  return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[Config, argparse.Namespace]:
  """Flags -> (Config, the parsed flags). Unset flags keep `Config`'s defaults.

  Raises:
    ValueError: a field out of its range (`Config.validate`).
  """
  args = create_parser().parse_args(argv)
  return config_lib.from_flags(args).validate(), args


def _train(argv: Optional[list[str]]) -> None:
  config, args = parse_args(argv)
  # Installed first: in a run of several processes, JAX's preemption notice
  # then takes SIGTERM over (`adder.distributed.preempted`).
  with stopping.on_signals() as stop:
    processes = distributed.initialize_distributed(args.coordinator, args.num_processes,
                                                   args.process_id)
    cpu_choice = devices.configure_cpu_devices(config.batch_size, processes=processes)
    if jax.default_backend() == "cpu":
      distributed.log(cpu_choice)
    train.train_and_evaluate(config, args.workdir, restart=args.restart, stop=stop)


def main(argv: Optional[list[str]] = None) -> int:
  """The CLI; returns the exit status listed in the module's docstring."""
  try:
    _train(argv)
  except (data_lib.DataError, checkpoint.CheckpointError, FloatingPointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return distributed.leave_run(2)
  except jax.errors.JaxRuntimeError as e:
    if not jax.distributed.is_initialized():
      raise
    # Most often a collective whose other side has gone.
    print(f"error: {(str(e).strip() or type(e).__name__).splitlines()[0]}; in a run of "
          "several processes this usually means that another process stopped: see its log",
          file=sys.stderr)
    return distributed.leave_run(1)
  except stopping.Stopped as e:
    print(f"stopped by {stopping.signal_name(e.signum)} {e}", file=sys.stderr)
    return e.status
  except KeyboardInterrupt as e:
    print("stopped by SIGINT" + (f" {e}" if str(e) else ""), file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
