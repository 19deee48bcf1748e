"""experiments/report.py and experiments/sweep.py: tables from workdirs, grid items to configs."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from adder.config import Config
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import batch_stats  # noqa: E402  pylint: disable=g-import-not-at-top
import hard_images  # noqa: E402  pylint: disable=g-import-not-at-top
import sweep  # noqa: E402  pylint: disable=g-import-not-at-top


def _scores(joint):
  return {"digit_acc": joint, "sum_acc": joint, "joint_acc": joint, "consistency": 1.0,
          "sum_given_digit": 0.999, "joint_acc_by_number": [joint] * 10}


def _workdir(path, seed, joints):
  path.mkdir()
  results = {"config": Config(seed=seed).to_dict(), "params": 17393, "backend": "cpu",
             "device_kind": "cpu", "devices": 2, "train_seconds": 1.0,
             "versions": {"jax": "x", "flax": "y", "optax": "z"},
             "final": {"test": _scores(joints[0]), "exhaustive": _scores(joints[1])},
             "swa": {"test": _scores(joints[2]), "exhaustive": _scores(joints[3])}}
  (path / "results.json").write_text(json.dumps(results))
  (path / "metrics.jsonl").write_text(json.dumps(
      {"epoch": 1, "train_loss": 0.1, "test_digit_acc": 0.9, "test_sum_acc": 0.9,
       "test_joint_acc": 0.9, "lr": 0.1, "seconds": 1.0}) + "\n")
  return str(path)


def _report(*workdirs):
  return subprocess.run([sys.executable, str(REPO / "experiments" / "report.py"), *workdirs],
                        capture_output=True, text=True, timeout=60)


def test_seeds_table_has_each_run_and_mean_and_sample_std(tmp_path):
  runs = [_workdir(tmp_path / str(s), s, [0.99 + s / 1000] * 4) for s in range(3)]
  r = _report(*runs)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert [l.split("|")[1].strip() for l in lines[2:5]] == ["0", "1", "2"]
  mean, std = statistics.mean([0.99, 0.991, 0.992]), statistics.stdev([0.99, 0.991, 0.992])
  assert f"**{mean:.2%} ± {std:.2%}**" in lines[5]
  # Then the digit accuracy and sum-given-digit of each run, and their mean.
  assert "| seed | final digit | final sum right, digit right |" in lines[7]
  assert lines[9].startswith("| 0 | 99.00% | 99.90% | 99.00% | 99.90% |")
  assert lines[12].startswith(f"| mean ± std | **{mean:.2%} ± {std:.2%}** | **99.90% ± 0.00%**")


def test_by_recipe_groups_runs_by_name_less_seed(tmp_path):
  a = [_workdir(tmp_path / f"lr=0.1_seed{s}", s, [0, 0.995 + s / 1000, 0, 0.996]) for s in (0, 1)]
  b = [_workdir(tmp_path / "lr=0.3_seed2", 2, [0, 0.99, 0, 0.98])]
  r = _report("--by-recipe", a[0], b[0], a[1])
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert len(lines) == 4
  std = 100 * statistics.stdev([0.995, 0.996])
  mean = f"99.55 ± {std:.2f} / 99.60 ± 0.00"  # final / SWA: joint, and digit (the same here)
  assert lines[2] == (f"| lr=0.1 | 0, 1 | 99.50 / 99.60, 99.60 / 99.60 | {mean} | {mean} | "
                      "99.90 ± 0.00 / 99.90 ± 0.00 |")
  assert lines[3].startswith("| lr=0.3 | 2 | 99.00 / 98.00 | 99.00 / 98.00 | 99.00 / 98.00 |")


def test_one_run_has_the_by_integer_table(tmp_path):
  r = _report(_workdir(tmp_path / "a", 0, [0.99] * 4))
  assert r.returncode == 0, r.stderr
  assert "| +0 | +1 |" in r.stdout and "| swa | 99.00% |" in r.stdout
  assert "99.900%" in r.stdout


def test_report_of_a_missing_run_is_one_error_line(tmp_path):
  r = _report(str(tmp_path / "nothing"))
  assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_sweep_grid_items():
  base = Config(epochs=20)
  assert sweep.parse_item("128:0.1", base) == base.replace(batch_size=128, lr=0.1)
  c = sweep.parse_item("augment_shift_px=3,augment_rotate_deg=15,swa=false", base)
  assert (c.augment_shift_px, c.augment_rotate_deg, c.swa) == (3.0, 15.0, False)
  assert sweep.parse_item("swa_lr=0.02", base).swa_lr == 0.02  # an Optional[float] field
  assert sweep.parse_item("swa_lr=none", base.replace(swa_lr=0.1)).swa_lr is None
  c = sweep.parse_item("conv_features=16x16x24x24x20,hidden_features=40", base)
  assert (c.conv_features, c.hidden_features) == ((16, 16, 24, 24, 20), 40)
  for bad in ("nonsense=1", "lr", "lr=", "swa_lr=fast", "conv_features=16x16x"):
    with pytest.raises(ValueError):
      sweep.parse_item(bad, base)


def test_sweep_mean_row_over_seeds():
  def run(seed, final, swa):
    return {"config": {"seed": seed}, "final": {"exhaustive": {"joint_acc": final}},
            "swa": {"exhaustive": {"joint_acc": swa}}}
  row = sweep.mean_row("lr=0.1", [run(0, 0.995, 0.994), run(1, 0.997, 0.996)])
  assert row == "| lr=0.1 | 0,1 | 0.9960 ± 0.0014 | 0.9950 ± 0.0014 |"
  # Without SWA results the SWA cell stays empty.
  assert sweep.mean_row("x", [{"config": {"seed": 0}, "final": {"exhaustive": {"joint_acc": 0.9}}},
                              {"config": {"seed": 1}, "final": {"exhaustive": {"joint_acc": 0.9}}}]
                        ).endswith("| 0.9000 ± 0.0000 |  |")


def test_batch_stats_table_counts_gains_ties_and_losses():
  stored, plain, swa = batch_stats.COLUMNS
  runs = {"a_seed0": {stored: 0.99500, plain: 0.99530, swa: 0.99540},
          "a_seed1": {stored: 0.99500, plain: 0.99500, swa: 0.99520},
          "b_seed0": {stored: 0.99600, plain: 0.99590}}  # no SWA weights
  lines = batch_stats.table(runs).splitlines()
  assert lines[2] == "| a_seed0 | 99.50% | 99.53% | 99.54% |"
  assert lines[4] == "| b_seed0 | 99.60% | 99.59% |  |"
  assert lines[5] == ("| mean of 3 runs (plain statistics: 1 higher, 1 the same, 1 lower) | "
                      "**99.53%** | **99.54%** | **99.53%** |")


def test_hard_images_table_counts_images_by_how_many_runs_misread_them():
  wrong = np.array([[1, 1, 0, 0, 1], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  lines = hard_images.table(wrong).splitlines()
  # Six misread images over the runs: image 0 three times, 1, 2 and 4 once each.
  assert lines[2:6] == ["| 3 of 3 runs | 1 | 50% |", "| 2 of 3 runs | 0 | 0% |",
                        "| 1 of 3 runs | 3 | 50% |", "| any run | 4 | |"]
  assert lines[7] == "Misread by one run: 2.0 images on the mean (1 to 3)."


def test_hard_images_misread_and_most_frequent_wrong_reading():
  labels = np.array([3, 5, 7])
  # Two runs; image 0 read 8 in three cases and 9 in one, image 1 always right,
  # image 2 read 1 in one case.
  readings = np.stack([np.array([3, 5, 7])[:, None].repeat(10, axis=1)] * 2)
  readings[0, 0, :2], readings[1, 0, 0], readings[1, 0, 1] = 8, 8, 9
  readings[1, 2, 4] = 1
  np.testing.assert_array_equal(hard_images.misread(readings, labels),
                                [[True, False, False], [True, False, True]])
  np.testing.assert_array_equal(hard_images.most_read_wrong(readings, labels), [8, 5, 1])


@pytest.mark.parametrize("script", ["batch_stats.py", "hard_images.py"])
def test_checkpoint_scripts_of_a_missing_run_are_one_error_line(tmp_path, script):
  r = subprocess.run([sys.executable, str(REPO / "experiments" / script),
                      str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_hard_images_refuses_a_gallery_in_no_folder_before_scoring(tmp_path):
  r = subprocess.run([sys.executable, str(REPO / "experiments" / "hard_images.py"),
                      "--gallery", str(tmp_path / "nowhere" / "g.png"), str(tmp_path)],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.endswith(f"error: --gallery: no folder {tmp_path / 'nowhere'}")
