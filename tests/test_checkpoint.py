"""adder.checkpoint: the saved weight sets and their config, and one clear error for
every bad checkpoint."""

import shutil

import jax
import numpy as np
import pytest

from adder import checkpoint
from adder.config import Config
from conftest import garble_weights

CONFIG = Config()


@pytest.fixture(name="workdir", scope="module")
def _workdir(checkpoint_workdir):
  return checkpoint_workdir


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("where", ["workdir", "checkpoint dir"])
def test_save_load_round_trip(workdir, weight_sets, where):
  path = workdir if where == "workdir" else workdir / "checkpoint"
  config, loaded = checkpoint.load(str(path))
  assert config == CONFIG
  assert sorted(loaded) == ["final", "swa"]
  _assert_trees_equal(loaded, weight_sets)
  assert checkpoint.preferred_weights(loaded) == "swa"


def test_save_overwrites(tmp_path, weight_sets):
  path = str(tmp_path / "checkpoint")
  checkpoint.save(path, weight_sets, CONFIG)
  checkpoint.save(path, {"final": weight_sets["swa"]}, CONFIG.replace(epochs=3))
  config, loaded = checkpoint.load(path)
  assert config.epochs == 3
  _assert_trees_equal(loaded, {"final": weight_sets["swa"]})
  assert checkpoint.preferred_weights(loaded) == "final"


def test_load_refuses_bad_checkpoints(tmp_path, workdir, weight_sets, monkeypatch):
  (tmp_path / "empty").mkdir()
  for name in ("garbled", "truncated_meta"):
    shutil.copytree(workdir / "checkpoint", tmp_path / name)
  garble_weights(tmp_path / "garbled")
  meta = tmp_path / "truncated_meta" / "meta" / "metadata"
  meta.write_bytes(meta.read_bytes()[:20])
  checkpoint.save(str(tmp_path / "narrow"), weight_sets,
                  CONFIG.replace(conv_features=(8, 8, 8, 8, 20)))
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "FORMAT", 99)
    checkpoint.save(str(tmp_path / "future"), weight_sets, CONFIG)

  # (directory, a word the message must hold)
  for name, word in [("missing", "not found"), ("empty", "not a checkpoint"),
                     ("garbled", "corrupt"), ("truncated_meta", "corrupt"),
                     ("narrow", "incompatible"), ("future", "format 99")]:
    with pytest.raises(checkpoint.CheckpointError) as info:
      checkpoint.load(str(tmp_path / name))
    message = str(info.value)
    assert word in message and "\n" not in message, (name, message)
