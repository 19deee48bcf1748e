"""Checkpoint round trip, image preparation, the prediction API and CLI, and plots.

No training: the tests save a randomly initialised model (BatchNorm statistics
taken from one batch of random images, so that predictions vary) with
`adder.checkpoint.save` into a temporary folder. The CLI runs in subprocesses
(``python -m adder.predict``), a few seconds each for JAX's start-up.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

from adder import checkpoint
from adder import model as model_lib
from adder import predict
from adder.config import Config
from conftest import garble_weights

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = Config()
MODEL = model_lib.create_model(CONFIG)

# A "4" as strokes in a box of unit height and 0.7 width: (x, y) with y down.
FOUR = [(0.5, 1.0), (0.5, 0.0), (0.0, 0.68), (0.7, 0.68)]


_APPLY_FN = jax.jit(functools.partial(MODEL.apply, train=False))


@pytest.fixture(name="workdir", scope="module")
def _workdir(checkpoint_workdir):
  return checkpoint_workdir


def _draw_digit(path, size, box, ink, paper, fmt):
  """Draw `FOUR` with stroke width 12% of the box height and save it.

  Args: size (W, H) of the image; box (left, top, height) of the digit.
  """
  img = Image.new("RGB", size, paper)
  left, top, height = box
  points = [(left + x * height, top + y * height) for x, y in FOUR]
  ImageDraw.Draw(img).line(points, fill=ink, width=round(0.12 * height), joint="curve")
  img.save(path, format=fmt)
  return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> pathlib.Path:
  """Light ink on a dark colour background, 90x130 PNG."""
  path = tmp_path_factory.mktemp("images") / "light_on_dark.png"
  return _draw_digit(path, (90, 130), (20, 25, 70), (250, 220, 40), (20, 30, 80), "PNG")


@pytest.fixture(scope="module")
def digit_jpeg(tmp_path_factory) -> pathlib.Path:
  """Dark ink on light paper, 240x180 JPEG, digit off centre."""
  path = tmp_path_factory.mktemp("images") / "dark_on_light.jpg"
  return _draw_digit(path, (240, 180), (120, 20, 140), (10, 10, 10), (235, 235, 225), "JPEG")


# --- Python API ------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, "final"])
def test_predictor_agrees_with_model(workdir, weight_sets, weights):
  predictor = predict.load(str(workdir), weights=weights)
  name = weights or "swa"
  assert predictor.weights == name
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
  numbers = rng.integers(0, 10, 16)

  digits, sums = predictor(images, numbers)
  digits_4d, sums_4d = predictor(images[..., None].astype(np.float32), numbers)

  digit_logits, sum_logits = _APPLY_FN(
      weight_sets[name], model_lib.normalize_images(images), numbers)
  for got in (digits, sums, digits_4d, sums_4d):
    assert isinstance(got, np.ndarray) and got.shape == (16,)
    assert np.issubdtype(got.dtype, np.integer)
  np.testing.assert_array_equal(digits, np.argmax(digit_logits, -1))
  np.testing.assert_array_equal(sums, np.argmax(sum_logits, -1))
  np.testing.assert_array_equal(digits_4d, digits)
  np.testing.assert_array_equal(sums_4d, sums)
  assert len(np.unique(digits)) > 1, "degenerate fixture: every image gets one class"
  digit_probs, _ = predictor.probabilities(images, numbers)
  np.testing.assert_allclose(digit_probs, jax.nn.softmax(digit_logits), atol=1e-5)


def test_predictor_rejects_bad_batches(tmp_path, workdir):
  predictor = predict.load(str(workdir))
  images = np.zeros((2, 28, 28), np.uint8)
  for bad_images, bad_numbers in [(images, np.array([3, 10])),
                                  (images, np.array([3])),
                                  (images, np.array([0.5, 1.0])),
                                  (np.zeros((2, 28, 27)), np.array([1, 2])),
                                  (np.zeros((2, 28, 28, 3)), np.array([1, 2]))]:
    with pytest.raises(ValueError):
      predictor(bad_images, bad_numbers)
  checkpoint.save(str(tmp_path / "final_only"), {"final": predictor.variables}, CONFIG)
  with pytest.raises(checkpoint.CheckpointError, match="no 'swa' weights"):
    predict.load(str(tmp_path / "final_only"), weights="swa")


# --- image preparation -------------------------------------------------------------


def _centre_of_mass(x: np.ndarray) -> tuple[float, float]:
  x = x.astype(np.float64)
  idx = np.arange(x.shape[0])
  return (x.sum(1) @ idx) / x.sum(), (x.sum(0) @ idx) / x.sum()


def test_prepare_image_mnist_form(digit_png, digit_jpeg):
  light_on_dark = predict.prepare_image(digit_png)
  dark_on_light = predict.prepare_image(str(digit_jpeg))
  for x in (light_on_dark, dark_on_light):
    assert x.shape == (28, 28) and x.dtype == np.uint8
    assert x.max() == 255
    # White on black: a black frame, ink inside the central 20x20 box ...
    frame = np.concatenate([x[:3].ravel(), x[-3:].ravel(), x[:, :3].ravel(), x[:, -3:].ravel()])
    assert frame.max() == 0
    rows, cols = np.flatnonzero(x.max(1)), np.flatnonzero(x.max(0))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 <= 20
    # ... centred by mass on pixel (14, 14), as MNIST.
    np.testing.assert_allclose(_centre_of_mass(x), (14, 14), atol=0.5)
    assert (x > 127).mean() < 0.3  # ink is the minority
  # Same digit, other size, polarity, colour and format: the same image.
  diff = np.abs(light_on_dark.astype(np.int32) - dark_on_light.astype(np.int32))
  assert diff.mean() < 8, diff.mean()
  assert np.corrcoef(light_on_dark.ravel(), dark_on_light.ravel())[0, 1] > 0.95
  # An image already in MNIST form stays (about) as it is.
  again = predict.prepare_image(Image.fromarray(light_on_dark))
  assert np.abs(again.astype(np.int32) - light_on_dark).mean() < 4


def test_prepare_image_refuses_non_images(tmp_path):
  text = tmp_path / "notes.png"
  text.write_text("not an image\n")
  blank = tmp_path / "blank.png"
  Image.new("L", (50, 40), 200).save(blank)
  for path, match in [(text, "not an image"), (tmp_path / "missing.png", "not found"),
                      (blank, "no digit")]:
    with pytest.raises(ValueError, match=match):
      predict.prepare_image(path)


# --- command line --------------------------------------------------------------------


def _run_cli(*args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  return subprocess.run(
      [sys.executable, "-m", "adder.predict", *map(str, args)],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False)


def test_cli_json(workdir, digit_jpeg):
  proc = _run_cli(workdir, digit_jpeg, 7, "--json")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert sorted(result) == ["digit", "digit_prob", "sum", "sum_prob"]
  # The API on the prepared image gives the same answer.
  predictor = predict.load(str(workdir))
  image = predict.prepare_image(digit_jpeg)[None]
  digits, sums = predictor(image, np.array([7]))
  digit_probs, sum_probs = predictor.probabilities(image, np.array([7]))
  assert (result["digit"], result["sum"]) == (int(digits[0]), int(sums[0]))
  assert result["digit_prob"] == pytest.approx(float(digit_probs[0].max()), abs=1e-6)
  assert result["sum_prob"] == pytest.approx(float(sum_probs[0].max()), abs=1e-6)


# Each case: (CLI arguments given the fixture paths, a word the message must hold).
BAD_INPUTS = {
    "number 10": (lambda p: (p["ckpt"], p["image"], "10"), "NUMBER"),
    "number x": (lambda p: (p["ckpt"], p["image"], "x"), "NUMBER"),
    "number -1": (lambda p: (p["ckpt"], p["image"], "-1"), "NUMBER"),
    "missing image": (lambda p: (p["ckpt"], p["tmp"] / "missing.png", "3"), "not found"),
    "text as image": (lambda p: (p["ckpt"], p["text"], "3"), "not an image"),
    "missing checkpoint": (lambda p: (p["tmp"] / "nowhere", p["image"], "3"), "not found"),
    "corrupt checkpoint": (lambda p: (p["garbled"], p["image"], "3"), "corrupt"),
    "incompatible checkpoint": (lambda p: (p["narrow"], p["image"], "3"), "incompatible"),
    "four arguments": (lambda p: (p["ckpt"], p["image"], "3", "4"), "[CHECKPOINT] IMAGE NUMBER"),
    "one argument": (lambda p: (p["image"],), "[CHECKPOINT] IMAGE NUMBER"),
}


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory, workdir, weight_sets, digit_png) -> dict:
  tmp = tmp_path_factory.mktemp("cli")
  text = tmp / "digit.png"
  text.write_text("this is text, not a PNG\n")
  shutil.copytree(workdir / "checkpoint", tmp / "garbled")
  garble_weights(tmp / "garbled", "ocdbt.process_*/d/*")
  # The default model's weights, stored with a config of narrower convolutions.
  checkpoint.save(str(tmp / "narrow"), weight_sets, CONFIG.replace(conv_features=(8, 8, 8, 8, 20)))
  return {"ckpt": workdir, "image": digit_png, "tmp": tmp, "text": text,
          "garbled": tmp / "garbled", "narrow": tmp / "narrow"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input(cli_paths, case):
  make_args, word = BAD_INPUTS[case]
  proc = _run_cli(*make_args(cli_paths), "--json")
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2, proc.stderr
  assert proc.stdout == ""
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert word in lines[0] and "Traceback" not in proc.stderr


