"""The workdir's saved training state: refusing a mismatched run, resuming, saving.

Every saved epoch is kept in ``<workdir>/state/`` (`adder.checkpoint`): the
TrainState (params, batch_stats, opt_state with the SWA average, step), the
epoch and the metrics rows so far, with the config that made them. The data
key is not stored: it is derived from ``config.seed``, which must match.
Running the same config again on the same workdir resumes after the last
saved epoch (`saved_run`, then `resume`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.sharding import NamedSharding

from adder import checkpoint
from adder import distributed
from adder.config import Config, run_differences, unsupported_fields


def make_workdir(workdir: str) -> None:
  """Create `workdir` (process 0); ValueError if it is a file or cannot be made."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a folder")
  if distributed.is_main_process():
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise ValueError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e


def saved_run(
    states: ocp.CheckpointManager, config: Config, *, restart: bool = False
) -> Optional[dict]:
  """The saved epoch to resume from: the meta of the last one in ``state/``, or None.

  With `restart`, every saved epoch is deleted first. A run saved with another
  config is refused, since resuming it would mix two runs; fields that change
  nothing computed (`adder.config.NOT_RUN_FIELDS`) may differ.

  Raises:
    ValueError: the saved run's config differs; the message names the fields.
    adder.checkpoint.CheckpointError: the saved state cannot be read.
  """
  if restart:
    checkpoint.clear_states(states)
  meta = checkpoint.latest_state_meta(states)
  if meta is None:
    return None
  removed = unsupported_fields(meta["config"])
  differences = {name: (value, "no longer a setting") for name, value in removed.items()}
  differences.update(run_differences(Config.from_dict(meta["config"]), config))
  if differences:
    listed = "; ".join(f"{name} {saved!r} there, {now!r} here"
                       for name, (saved, now) in differences.items())
    raise ValueError(
        f"{states.directory} holds a run with another config ({listed}): give the same "
        "flags to resume it, --restart to start over, or another --workdir")
  return meta


def resume(
    config: Config,
    state: Any,
    states: ocp.CheckpointManager,
    saved: Optional[dict],
    steps_per_epoch: int,
    sharding: NamedSharding,
) -> tuple[Any, list[dict]]:
  """The saved epoch's TrainState and metrics rows; with nothing saved, `state` and no rows.

  `state` is a fresh TrainState, the template of the restore. The arrays are
  restored to the host and replicated by `sharding`, as a fresh state is placed.
  """
  if saved is None:
    return state, []
  host = distributed.to_host(state)
  restored = serialization.from_state_dict(host, checkpoint.restore_state(
      states, saved["epoch"], serialization.to_state_dict(host)))
  if int(restored.step) != saved["epoch"] * steps_per_epoch:
    raise checkpoint.CheckpointError(
        f"the training state saved in {states.directory} after epoch {saved['epoch']} is "
        f"at step {int(restored.step)}, not {saved['epoch'] * steps_per_epoch}; "
        "pass --restart to start over")
  distributed.log(f"resuming after epoch {saved['epoch']}/{config.epochs}, saved in "
                  f"{states.directory} (--restart starts over)")
  return distributed.replicate(restored, sharding), list(saved["history"])


def save_state(
    states: ocp.CheckpointManager,
    epoch: int,
    state: Any,
    history: list[dict],
    config: Config,
) -> None:
  """Start saving the TrainState, `config` and the rows so far as step `epoch` of ``state/``.

  Collective (every process calls it). The state is first copied to host
  numpy arrays, so the write that continues in the background never reads
  buffers that the next epoch, which donates the state, reuses.
  """
  host = jax.tree_util.tree_map(np.array, distributed.to_host(state))
  checkpoint.save_state(states, epoch, serialization.to_state_dict(host),
                        {"config": config.to_dict(), "history": list(history)})
