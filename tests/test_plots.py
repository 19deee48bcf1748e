"""adder/plots.py's samples and titles, experiments/architecture.py, experiments/sample_digit.py."""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from adder import model as model_lib
from adder import plots
from adder.config import Config
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import architecture  # noqa: E402  pylint: disable=g-import-not-at-top
import sample_digit  # noqa: E402  pylint: disable=g-import-not-at-top


def _cases(n, wrong_digit=(), wrong_sum=()):
  """n test cases, all right except a wrong digit (and so sum) or a wrong sum alone."""
  labels, numbers = np.arange(n) % 10, (3 * np.arange(n)) % 10
  digit_pred, sum_pred = labels.copy(), labels + numbers
  for i in wrong_digit:
    digit_pred[i] = (labels[i] + 1) % 10
    sum_pred[i] = digit_pred[i] + numbers[i]
  for i in wrong_sum:
    sum_pred[i] = (sum_pred[i] + 1) % 19
  return labels, numbers, digit_pred, sum_pred


def test_samples_are_the_first_cases_and_the_first_wrong_ones():
  wrong_digit, wrong_sum = [3, 41, 60, 80, 95], [40, 50, 70, 90, 99]
  labels, numbers, digit_pred, sum_pred = _cases(100, wrong_digit, wrong_sum)
  shown = plots.select_samples(labels, numbers, digit_pred, sum_pred, num=32, num_wrong=8)
  first_wrong = [3, 40, 41, 50, 60, 70, 80, 90]  # the first 8 of the 10 wrong cases
  first = [i for i in range(100) if i not in first_wrong][:24]
  np.testing.assert_array_equal(shown, sorted(first + first_wrong))


def test_samples_fill_up_with_wrong_cases_and_never_exceed_the_cases():
  labels, numbers, digit_pred, sum_pred = _cases(50, wrong_digit=range(50))
  np.testing.assert_array_equal(
      plots.select_samples(labels, numbers, digit_pred, sum_pred, num=32, num_wrong=8),
      np.arange(32))
  labels, numbers, digit_pred, sum_pred = _cases(5)
  np.testing.assert_array_equal(
      plots.select_samples(labels, numbers, digit_pred, sum_pred), np.arange(5))


@pytest.fixture
def drawn(monkeypatch):
  """The figures the plots would save, kept instead of written."""
  figures = []
  monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
  return figures


def test_samples_show_the_truth_beside_a_wrong_prediction_in_red(drawn):
  labels, numbers, digit_pred, sum_pred = _cases(40, wrong_digit=[2], wrong_sum=[30])
  images = np.zeros((40, 28, 28), np.uint8)
  plots.plot_samples(images, labels, numbers, digit_pred, sum_pred, "x.png", weights="swa")
  (fig,) = drawn
  titles = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title()}
  assert len(titles) == 32
  # case 2: 2 + 6, read as 3 (sum 9); case 30: 0 + 0, sum 0 read as 1.
  assert titles["#2  2 + 6\nd 2→3  s 8→9"] == "red"
  assert titles["#30  0 + 0\nd 0→0  s 0→1"] == "red"
  assert titles["#0  0 + 0\nd 0  s 0"] == "black"
  suptitle = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert suptitle.startswith("Test pairs, SWA weights, 30 right and 2 wrong (2 of 40 wrong in all)")


def test_mistakes_and_confusion_titles_name_the_weights_and_counts(drawn):
  labels, numbers, digit_pred, sum_pred = _cases(1200, wrong_digit=[5, 7], wrong_sum=[9])
  images = np.zeros((1200, 28, 28), np.uint8)
  plots.plot_mistakes(images, labels, numbers, digit_pred, sum_pred, "m.png", weights="final")
  plots.plot_confusion(labels, digit_pred, "c.png", weights="swa")
  plots.plot_confusion(labels, digit_pred, "c.png")
  mistakes_fig, confusion_fig, unnamed_fig = drawn
  assert mistakes_fig._suptitle.get_text().startswith(  # pylint: disable=protected-access
      "Wrong test pairs, final weights, 3 of 1,200 (the first 3)")
  assert confusion_fig.axes[0].get_title() == (
      "Digit head confusion, SWA weights, test images\n(1,198 of 1,200 right)")
  assert unnamed_fig.axes[0].get_title().startswith("Digit head confusion, test images")


def test_architecture_layers_come_from_the_model():
  for config in (Config(), Config(conv_features=(16, 20, 20, 20, 20), hidden_features=40)):
    boxes = architecture.layers(config)
    model = model_lib.create_model(config)
    params = model_lib.init_variables(model, jax.random.PRNGKey(0))["params"]
    assert sum(b["params"] for b in boxes) == model_lib.count_params(params)
    image = [b for b in boxes if b["branch"] == "image"]
    assert [b["shape"][:2] for b in image[:-1]] == [
        (28, 28), (26, 26), (24, 24), (12, 12), (10, 10), (8, 8), (4, 4), (2, 2)]
    assert [b["op"] for b in image].count("max pool 2x2") == 2
    assert image[-1]["shape"] == (config.conv_features[-1],)
    one_hot, concat = boxes[len(image) + 1], boxes[len(image) + 2]
    assert one_hot["shape"] == (10,)
    assert concat["shape"] == (config.conv_features[-1] + 10,)
    heads = {b["name"]: b["shape"] for b in boxes if b["branch"] == "head"}
    assert heads == {"digit_head": (10,), "sum_head": (19,)}


def test_architecture_script_draws_the_figure_and_prints_the_table(tmp_path, capsys):
  out = tmp_path / "arch.png"
  assert architecture.main(["--out", str(out)]) == 0
  with Image.open(out) as img:
    assert img.format == "PNG" and min(img.size) > 300
  printed = capsys.readouterr().out
  assert "| conv1 + bn1 | conv 3x3, BN, ReLU | 24x24x16 | 2,336 |" in printed
  assert printed.rstrip().endswith(f"17,393 parameters; wrote {out}")


def test_architecture_script_refuses_a_missing_run(tmp_path, capsys):
  assert architecture.main(["--out", str(tmp_path / "a.png"),
                            "--config-from", str(tmp_path / "none")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_sample_digit_is_a_dark_on_light_enlargement():
  image = np.zeros((28, 28), np.uint8)
  image[10:18, 12:14] = 255  # a white stroke on black, as MNIST stores it
  scan = np.asarray(sample_digit.as_scan(image))
  assert scan.shape == (28 * sample_digit.SCALE, 28 * sample_digit.SCALE)
  assert scan[0, 0] == 255 and scan[14 * 4 + 2, 13 * 4] == 0  # paper white, ink black


def test_the_shipped_sample_digit_is_small_and_grey():
  path = REPO / "examples" / "seven.png"
  assert path.stat().st_size < 8 * 1024
  with Image.open(path) as img:
    assert img.mode == "L" and img.size == (112, 112)


def test_write_all_plots(tmp_path):
  rng = np.random.default_rng(0)
  n = 40
  labels, numbers = rng.integers(0, 10, n), rng.integers(0, 10, n)
  digit_pred = np.where(np.arange(n) % 5 == 0, (labels + 1) % 10, labels)
  history = [{"epoch": e, "train_loss": 1.0 / e, "test_digit_acc": 1 - 0.1 / e,
              "test_sum_acc": 1 - 0.12 / e, "test_joint_acc": 1 - 0.15 / e,
              "test_consistency": 0.99, "test_loss": 1.2 / e, "lr": 0.1 * e * (4 - e),
              "seconds": 1.0}
             for e in (1, 2, 3)]
  paths = plots.write_all(str(tmp_path / "wd"), history,
                          rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                          labels, numbers, digit_pred, digit_pred + numbers)
  names = ["loss.png", "accuracy.png", "lr.png", "samples.png", "mistakes.png",
           "confusion.png"]
  assert [os.path.basename(p) for p in paths] == names
  for path in paths:
    with Image.open(path) as img:
      assert img.format == "PNG" and min(img.size) > 100
  counts = plots.confusion_matrix(labels, digit_pred)
  assert counts.sum() == n and np.trace(counts) == n - len(range(0, n, 5))


def test_mistakes_are_the_cases_with_a_wrong_digit_or_sum():
  labels, numbers = np.array([1, 2, 3, 4]), np.array([0, 5, 9, 1])
  digit_pred = np.array([1, 7, 3, 4])  # case 1: digit wrong (and so its sum)
  sum_pred = np.array([1, 12, 11, 5])  # case 2: digit right, sum wrong
  np.testing.assert_array_equal(plots.mistakes(labels, numbers, digit_pred, sum_pred), [1, 2])
