"""The trained weights on disk: an orbax-checkpoint directory, saved and checked.

A checkpoint is one orbax ``CompositeCheckpointHandler`` directory with two
items:

* ``weights`` (``StandardSave``): ``{set_name: {"params": ..., "batch_stats":
  ...}}`` with ``set_name`` in ``"final"`` (the last training step; after augmented
  training, with BatchNorm statistics recomputed on the plain images) and
  ``"swa"`` (the averaged parameters with recomputed BatchNorm statistics,
  absent with ``--no-swa``); float32 numpy arrays.
* ``meta`` (``JsonSave``): ``{"format": FORMAT, "config": Config.to_dict(),
  "weight_sets": [...]}``. The stored config rebuilds the model, so a
  checkpoint is self-describing.

`load` accepts a training workdir (the ``checkpoint/`` inside it is used) or the
checkpoint directory itself, restores numpy arrays on the host (no sharding
information needed), and checks the weights against a model built from the
stored config. Every failure is a `CheckpointError` with a one-line message.

The training state, for resuming, is kept apart in ``<workdir>/state/`` by an
orbax ``CheckpointManager`` (`open_states`): one step per finished epoch, the
last `KEEP_STATES` kept, each with two items: ``state`` (``StandardSave``, a
pytree of host numpy arrays; `adder.train` decides what is in it) and
``meta`` (``JsonSave``: ``{"format": STATE_FORMAT, "epoch", "config",
"history"}``). Saves are asynchronous and atomic: a step appears on disk only
once all of it is written, so an interrupted save leaves the previous epoch
as the latest. Orbax saves and restores are collective: every process calls
them, and orbax writes from the primary process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from adder import model as model_lib
from adder.config import Config

FORMAT = 1  # bump when the layout of the items changes
CHECKPOINT_DIRNAME = "checkpoint"  # name of the checkpoint inside a workdir
WEIGHT_SETS = ("swa", "final")  # in order of preference

STATE_DIRNAME = "state"  # the training state inside a workdir, one step per epoch
STATE_FORMAT = 1  # bump when the layout of a saved training state changes
KEEP_STATES = 2  # epochs kept in state/: the last, and one more should it be unreadable

_WEIGHTS = "weights"
_STATE = "state"
_META = "meta"


class CheckpointError(Exception):
  """A checkpoint is missing, unreadable, corrupt or does not fit its model."""


def _handler_registry(arrays: str = _WEIGHTS) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Handlers for a pytree of arrays under the name `arrays`, and the JSON ``meta``."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(arrays, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
  registry.add(arrays, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add(_META, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
  registry.add(_META, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return registry


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """Orbax's absl log lines silenced while the block runs.

  Orbax logs routine steps at INFO/WARNING and recoverable oddities (an
  unreadable ``_CHECKPOINT_METADATA``) at ERROR; real failures raise, so the
  logger is muted while it works.
  """
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


@contextlib.contextmanager
def _checkpointer() -> Iterator[ocp.Checkpointer]:
  """A synchronous orbax Checkpointer, quiet (see `_quiet_orbax`)."""
  with _quiet_orbax(), ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(handler_registry=_handler_registry())) as ckptr:
    yield ckptr


def save(path: str, weight_sets: dict[str, dict], config: Config) -> None:
  """Write `weight_sets` and `config` to the checkpoint directory `path`.

  Args:
    path: the checkpoint directory (e.g. ``<workdir>/checkpoint``); replaced
      if it exists.
    weight_sets: ``{"final": {"params": ..., "batch_stats": ...}}``, optionally
      with ``"swa"`` of the same structure; arrays are fetched to the host.
    config: the run's config; `load` rebuilds the model from it.

  Collective: in a run of several processes every process calls it, with the
  same weights; orbax writes numpy arrays (taken as replicated) and the JSON
  from process 0 alone.
  """
  unknown = set(weight_sets) - set(WEIGHT_SETS)
  if not weight_sets or unknown:
    raise ValueError(f"weight sets must be among {WEIGHT_SETS}, got {sorted(weight_sets)}")
  weights = jax.tree_util.tree_map(np.asarray, jax.device_get(weight_sets))
  meta = {"format": FORMAT, "config": config.to_dict(), "weight_sets": sorted(weight_sets)}
  with _checkpointer() as ckptr:
    ckptr.save(
        os.path.abspath(path),
        ocp.args.Composite(**{_WEIGHTS: ocp.args.StandardSave(weights),
                              _META: ocp.args.JsonSave(meta)}),
        force=True)


def find(path: str) -> str:
  """The checkpoint directory for `path`: a training workdir or the checkpoint itself."""
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path} does not exist")
  if not os.path.isdir(path):
    raise CheckpointError(f"not a checkpoint: {path} is a file, not a directory")
  inner = os.path.join(path, CHECKPOINT_DIRNAME)
  if os.path.isdir(inner):  # a workdir; if its checkpoint is broken, reading says so
    return os.path.abspath(inner)
  if os.path.isdir(os.path.join(path, _META)) and os.path.isdir(os.path.join(path, _WEIGHTS)):
    return os.path.abspath(path)
  raise CheckpointError(
      f"not a checkpoint: {path} holds neither {CHECKPOINT_DIRNAME}/ (a training "
      f"workdir) nor the {_META}/ and {_WEIGHTS}/ items of a checkpoint")


def _summary(err: BaseException) -> str:
  """The first line of an exception, shortened (tensorstore errors are long)."""
  text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return text if len(text) <= 200 else text[:197] + "..."


def _expected_shapes(config: Config) -> Any:
  """{"params": ..., "batch_stats": ...} of ShapeDtypeStructs for `config`'s model."""
  model = model_lib.create_model(config)
  rng = jax.ShapeDtypeStruct((2,), np.uint32)  # a PRNGKey's shape: nothing is computed
  return jax.eval_shape(lambda key: model_lib.init_variables(model, key), rng)


def _shape_table(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(p, "key", p)) for p in k): tuple(v.shape) for k, v in flat}


def _check_compatible(stored: Any, expected: Any, config: Config) -> list[str]:
  """Names of the stored weight sets; raises if any differs from the model."""
  if not isinstance(stored, dict) or not stored:
    raise CheckpointError("incompatible checkpoint: the weights item is not a dict of weight sets")
  names = [n for n in WEIGHT_SETS if n in stored]
  unknown = sorted(set(stored) - set(WEIGHT_SETS))
  if unknown or not names:
    raise CheckpointError(
        f"incompatible checkpoint: weight sets {sorted(stored)}, expected "
        f"'final' and optionally 'swa'")
  want = _shape_table(expected)
  for name in names:
    got = _shape_table(stored[name])
    for key in sorted(set(want) | set(got)):
      if want.get(key) != got.get(key):
        raise CheckpointError(
            f"incompatible checkpoint: {name}/{key} has shape {got.get(key)} but the "
            f"model of the stored config (conv_features={list(config.conv_features)}, "
            f"hidden_features={config.hidden_features}) needs {want.get(key)}")
  return names


def _drop_orphaned_reads(record: logging.LogRecord) -> bool:
  """Logging filter: False for asyncio's report of a failed tensorstore read."""
  exc = record.exc_info[1] if record.exc_info else None
  return not (record.getMessage().startswith("Future exception was never retrieved")
              and exc is not None and "tensorstore" in str(exc))


def _quiet_failed_reads() -> None:
  """Drop the noise orbax/tensorstore leave behind when a restore fails.

  When one array read fails, orbax's event loop closes while tensorstore still
  completes the other reads: they report "Event loop is closed" through
  `sys.unraisablehook` and "Future exception was never retrieved" through the
  ``asyncio`` logger, after the real error has been raised (a dozen
  tracebacks on stderr). Only those two messages are filtered; everything
  else passes through. Idempotent.
  """
  logging.getLogger("asyncio").addFilter(_drop_orphaned_reads)  # no-op if present
  if getattr(sys.unraisablehook, "_adder_filter", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return
    previous(unraisable)

  hook._adder_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def load(path: str) -> tuple[Config, dict[str, dict]]:
  """Restore a checkpoint written by `save`.

  Args:
    path: a training workdir (holding ``checkpoint/``) or the checkpoint
      directory itself.

  Returns:
    ``(config, weight_sets)``: the stored config and ``{"final": {"params":
    ..., "batch_stats": ...}[, "swa": ...]}`` of float32 numpy arrays.

  Raises:
    CheckpointError: missing path, not a checkpoint, unreadable or corrupt
      files, unknown format, or weights that do not fit the stored config.
  """
  ckpt_dir = find(path)
  _quiet_failed_reads()
  with _checkpointer() as ckptr:
    try:
      meta = ckptr.restore(ckpt_dir, ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: cannot read its {_META} item "
                            f"({_summary(e)})") from e
    if not isinstance(meta, dict) or "format" not in meta or "config" not in meta:
      raise CheckpointError(f"not an adder checkpoint: {ckpt_dir} has no format/config in "
                            f"its {_META} item")
    if meta["format"] != FORMAT:
      raise CheckpointError(f"incompatible checkpoint: format {meta['format']!r}, this "
                            f"version reads format {FORMAT}")
    try:
      config = Config.from_dict(meta["config"])
      expected = _expected_shapes(config)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"incompatible checkpoint: its stored config does not build a "
                            f"model ({_summary(e)})") from e

    try:
      item = ckptr.metadata(ckpt_dir).item_metadata[_WEIGHTS]
      stored = item.tree if item is not None else None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: cannot read the metadata of "
                            f"its {_WEIGHTS} ({_summary(e)})") from e
    if stored is None:
      raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: the metadata of its "
                            f"{_WEIGHTS} is missing")
    names = _check_compatible(stored, expected, config)

    target = {n: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), expected)
              for n in names}
    try:
      weights = ckptr.restore(
          ckpt_dir, ocp.args.Composite(**{_WEIGHTS: ocp.args.StandardRestore(target)}))[_WEIGHTS]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"corrupt checkpoint {ckpt_dir}: cannot read its {_WEIGHTS} "
                            f"({_summary(e)})") from e
  weights = jax.tree_util.tree_map(np.asarray, weights)
  return config, {n: {"params": weights[n]["params"], "batch_stats": weights[n]["batch_stats"]}
                  for n in names}


def preferred_weights(weight_sets: dict[str, dict]) -> str:
  """Name of the weights to predict with: ``"swa"`` if present, else ``"final"``."""
  for name in WEIGHT_SETS:
    if name in weight_sets:
      return name
  raise KeyError(f"no 'swa' or 'final' weights among {sorted(weight_sets)}")


# --- the training state, for resuming --------------------------------------------


@contextlib.contextmanager
def open_states(workdir: str) -> Iterator[ocp.CheckpointManager]:
  """The orbax CheckpointManager of ``<workdir>/state``, closed (saves finished) on exit.

  One step per finished epoch, numbered by the epoch; the last `KEEP_STATES`
  are kept. Saves run in the background (see `save_state`); the temporary
  folder of a save that never finished is left as it is, and never read.
  Every process must open it and call the functions below (they are
  collective).
  """
  # No cleanup_tmp_directories: it runs in a thread that close() does not
  # wait for, which fails (with a traceback) if the process ends at once.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=KEEP_STATES, create=True, enable_async_checkpointing=True)
  with _quiet_orbax():
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, STATE_DIRNAME)), options=options,
        handler_registry=_handler_registry(_STATE))
  try:
    yield manager
  finally:
    with _quiet_orbax():
      manager.close()


def save_state(manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict) -> None:
  """Start saving `state` and `meta` as step `epoch`; returns before the files are written.

  Args:
    manager: from `open_states`.
    epoch: the epoch just finished (1-based), the step's number.
    state: a pytree of host numpy arrays that nothing will modify (the write
      continues in the background).
    meta: JSON-serialisable; ``format`` and ``epoch`` are added.
  """
  with _quiet_orbax():
    manager.save(epoch, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _META: ocp.args.JsonSave({**meta, "format": STATE_FORMAT, "epoch": epoch})}))


def latest_state_meta(manager: ocp.CheckpointManager) -> Optional[dict]:
  """The ``meta`` of the latest saved epoch (see `save_state`), or None if none is saved.

  Raises:
    CheckpointError: it cannot be read, or was written in another format.
  """
  epoch = manager.latest_step()
  if epoch is None:
    return None
  where = os.path.join(str(manager.directory), str(epoch))
  try:
    with _quiet_orbax():
      meta = manager.restore(
          epoch, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot read the saved training state {where} ({_summary(e)}); "
                          "pass --restart to start over") from e
  if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or "config" not in meta:
    raise CheckpointError(f"the saved training state {where} is not in format {STATE_FORMAT}; "
                          "pass --restart to start over")
  return meta


def restore_state(manager: ocp.CheckpointManager, epoch: int, target: Any) -> Any:
  """The ``state`` item of step `epoch`, as host numpy arrays shaped like `target`'s.

  Raises:
    CheckpointError: it cannot be read or does not fit `target`.
  """
  _quiet_failed_reads()
  try:
    with _quiet_orbax():
      return manager.restore(epoch, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(target)}))[_STATE]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"cannot restore the saved training state {manager.directory}/{epoch} "
        f"({_summary(e)}); pass --restart to start over") from e


def clear_states(manager: ocp.CheckpointManager) -> None:
  """Delete every saved epoch (``--restart``)."""
  with _quiet_orbax():
    for epoch in manager.all_steps():
      manager.delete(epoch)


def wait_for_saves(manager: ocp.CheckpointManager) -> Optional[int]:
  """Finish the saves under way; the latest epoch now complete on disk, or None."""
  with _quiet_orbax():
    manager.wait_until_finished()
    manager.reload()
    return manager.latest_step()
