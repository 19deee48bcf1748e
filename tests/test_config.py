"""adder.config: one Config that checks itself, its flags defined once, saved configs."""

import argparse
import dataclasses
import math
import sys

import pytest

from adder import config as config_lib
from adder.config import Config, run_differences
from conftest import REPO, TINY


def test_run_differences_ignore_where_the_data_is():
  assert run_differences(TINY, TINY.replace(mnist_dir="/a", data_dir="/b", require_gpu=True,
                                            eval_batch_size=7)) == {}
  assert run_differences(TINY, TINY.replace(lr=0.1, swa=False)) == {
      "lr": (0.05, 0.1), "swa": (True, False)}



def test_a_config_saved_before_a_field_existed_reads_as_it_ran():
  saved = Config().to_dict()
  for name in ("augment_scale", "consistency_weight", "swa_lr", "plain_batch_stats"):
    del saved[name]
  old = Config.from_dict({**saved, "unknown_field": 1, "label_smoothing": 0.0})
  assert (old.augment_scale, old.consistency_weight, old.swa_lr, old.plain_batch_stats) == (
      0.0, 0.0, None, False)
  assert Config().consistency_weight > 0 and Config().augment_scale > 0  # not the defaults
  assert Config().plain_batch_stats
  assert Config.from_dict(Config().to_dict()) == Config()


def test_a_saved_run_that_set_a_removed_field_is_named():
  saved = {**Config().to_dict(), "label_smoothing": 0.1, "plain_last_epochs": 0}
  assert config_lib.unsupported_fields(saved) == {"label_smoothing": 0.1}
  assert config_lib.unsupported_fields(Config().to_dict()) == {}


def test_the_defaults_and_the_original_recipe_are_valid():
  assert Config().validate() == Config()
  assert Config().without_augmentation().replace(consistency_weight=0.0, swa_lr=0.05).validate()


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs (--epochs) must be at least 1, got 0"),
    ({"lr": 0.0}, "lr (--lr) must be more than 0, got 0.0"),
    ({"lr": math.nan}, "lr (--lr) must be more than 0, got nan"),
    ({"augment_rotate_deg": 181.0}, "augment_rotate_deg (--augment-rotate) must be at least 0 "
                                    "and at most 180, got 181.0"),
    ({"pct_start": 0.0}, "pct_start must be more than 0 and at most 1, got 0.0"),
    ({"bn_momentum": 1.5}, "bn_momentum must be at least 0 and at most 1, got 1.5"),
    ({"eval_batch_size": 0}, "eval_batch_size must be at least 1, got 0"),
    ({"conv_features": (16, 0)}, "conv_features must be positive channel counts"),
])
def test_validate_names_the_field_its_flag_and_its_range(change, message):
  with pytest.raises(ValueError) as e:
    Config(**change).validate()
  assert str(e.value).startswith(message)


def test_train_and_evaluate_validates_before_anything_else(tmp_path):
  from adder import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="batch_size"):
    train.train_and_evaluate(Config(batch_size=0), str(tmp_path / "never"))
  assert not (tmp_path / "never").exists()


def _flags(parser):
  return {a.dest: a for a in parser._actions if a.option_strings}  # pylint: disable=protected-access


def test_every_recipe_flag_is_defined_once_and_shared():
  from adder import cli, lr_find  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO / "experiments"))
  import torch_reference  # pylint: disable=g-import-not-at-top
  train_flags = _flags(cli.create_parser())
  fields = {f.name: f for f in dataclasses.fields(Config)}
  for name in config_lib.TRAIN_FLAGS:
    action = train_flags[name]
    assert action.option_strings == [fields[name].metadata["flag"]]
    assert action.default == fields[name].default
  # lr_find and the PyTorch reference take the same definitions (same help, same default).
  lr_flags = {k: v for k, v in _flags(lr_find.create_parser()).items() if k in fields}
  reference_flags = {k: v for k, v in _flags(torch_reference.create_parser()).items() if k in fields}
  assert set(lr_flags) == {"batch_size", "seed", *config_lib.DATA_FLAGS}
  assert set(reference_flags) == set(config_lib.REFERENCE_FLAGS)
  for name, action in {**lr_flags, **reference_flags}.items():
    assert (action.option_strings, action.help, action.default) == (
        train_flags[name].option_strings, train_flags[name].help, train_flags[name].default)


def test_from_flags_reads_back_what_add_flags_parsed():
  parser = argparse.ArgumentParser()
  config_lib.add_flags(parser, config_lib.TRAIN_FLAGS)
  args = parser.parse_args(["--epochs", "7", "--no-swa", "--augment-scale", "0",
                            "--running-batch-stats", "--mnist-dir", "/m"])
  assert config_lib.from_flags(args).validate() == Config(epochs=7, swa=False, augment_scale=0.0,
                                               plain_batch_stats=False, mnist_dir="/m")
  assert config_lib.from_flags(parser.parse_args(["--no-augment"])).augment is False
