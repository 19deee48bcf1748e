"""Several processes: placing host arrays on the mesh, process 0, and agreeing.

A run of several processes (`initialize_distributed`) runs the whole training
program in every process, in step: the jitted calls and orbax's saves and
restores are collective. Only process 0 prints (`log`) and writes the plain
files (`is_main_process`); a choice that decides a collective call is process
0's (`agree`); the waits for another process are bounded
(`DISTRIBUTED_TIMEOUTS`). With one process, every function here is trivial.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

# How long the processes of a run wait for one another, in seconds: keyword
# arguments of `jax.distributed.initialize` (the same names in JAX 0.10 and
# 0.11). Whatever happens to one process, the others end within these bounds.
DISTRIBUTED_TIMEOUTS = {
    # Every process must have joined within this of the first: hosts started
    # by hand or by a scheduler may lag (JAX's default).
    "initialization_timeout": 300,
    # A process that sends no heartbeat for this long (killed, its host lost)
    # is declared dead, and every other process is ended with an error that
    # says so (JAX's default: 100). Heartbeats come from a thread of their
    # own, so a busy or compiling process still sends them.
    "heartbeat_timeout_seconds": 60,
    # How long a finished process waits at exit for the others; past it, all
    # are ended with an error. This also bounds how long the others, blocked
    # in a collective, wait for a process that left with an error (JAX's
    # default: 300). Processes finish together: `adder.train.train_and_evaluate`
    # ends with a collective, after process 0's plots.
    "shutdown_timeout_seconds": 60,
}


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays, identical on every process, as global arrays laid out by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard(tree: Any, sharding: NamedSharding) -> Any:
  """Host arrays, identical on every process, as global arrays split by `sharding`."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i]), tree)


def to_host(tree: Any) -> Any:
  """Fully replicated (or local) arrays as numpy, on any process."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def is_main_process() -> bool:
  """Only process 0 prints and writes the plain files (metrics, results, plots).

  Orbax writes the checkpoints from process 0 too, but every process calls its
  saves and restores, which are collective.
  """
  return jax.process_index() == 0


def log(*args) -> None:
  """`print` on process 0, flushed."""
  if is_main_process():
    print(*args, flush=True)


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process: for a choice that decides a collective call.

  A collective (an orbax save) that some processes call and others do not
  never ends; a choice made from each process's own clock could differ.
  """
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def preempted(epoch: int) -> bool:
  """Whether a run of several processes stops after `epoch`, as one of them got SIGTERM.

  There, JAX's preemption notifier takes SIGTERM over from Python, tells every
  process, and this answers True on all of them after the same epoch. Every
  process calls it after every epoch; False for a single process.
  """
  return multihost_utils.reached_preemption_sync_point(epoch)


def wait_for_every_process(name: str) -> None:
  """Block until every process has called this with the same `name` (collective)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"adder: {name}")


def _launched_processes() -> int:
  """The process count that a cluster launcher announces; 1 when none does."""
  return max(int(os.environ.get(v, "1") or 1) for v in _CLUSTER_ENV)


def initialize_distributed(
    coordinator: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> int:
  """Join a multi-process run: with the flags, or when a cluster launcher is seen.

  With no flags, ``jax.distributed.initialize()`` is called only when a
  launcher says there are several processes (SLURM, Open MPI, MPICH/PMI) or
  ``JAX_COORDINATOR_ADDRESS`` is set; JAX then reads the rest from the
  environment. A single process needs none of this. Call it before JAX's
  backend starts, and before `adder.devices.configure_cpu_devices`, which
  needs the process count. The waits are bounded by `DISTRIBUTED_TIMEOUTS`.

  Returns:
    The number of processes in the run (1: this one alone).
  """
  if coordinator or num_processes is not None or process_id is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **DISTRIBUTED_TIMEOUTS)
    return num_processes or _launched_processes()
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or _launched_processes() > 1:
    jax.distributed.initialize(**DISTRIBUTED_TIMEOUTS)
    return _launched_processes()
  return 1


def leave_run(status: int) -> int:
  """`status`; in a run of several processes, end this process now with it.

  At exit `jax.distributed.shutdown` waits for every other process, and after
  a failure some never come (one has died, or they wait in a collective that
  this process has left): the wait would end in an abort only after
  `DISTRIBUTED_TIMEOUTS`. Leaving at once ends the others sooner: their next
  collective fails, or the coordinator, in process 0, goes with it.
  """
  if jax.distributed.is_initialized():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status
