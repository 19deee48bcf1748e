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
from adder import plots
from adder import predict
from adder.config import Config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = Config()
MODEL = model_lib.create_model(CONFIG)

# A "4" as strokes in a box of unit height and 0.7 width: (x, y) with y down.
FOUR = [(0.5, 1.0), (0.5, 0.0), (0.0, 0.68), (0.7, 0.68)]


def _variables(seed: int) -> dict:
  """Random weights with BatchNorm statistics of a batch of random images (numpy).

  Drawn with numpy rather than `init_variables`: compiling JAX's random
  initialisers takes many seconds on a CPU.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda key: model_lib.init_variables(MODEL, key),
                          jax.ShapeDtypeStruct((2,), np.uint32))

  def draw(path, s):
    if len(s.shape) > 1:  # kernels: He normal
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    centre = 1.0 if path[-1].key == "scale" else 0.0
    return (centre + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  variables = {
      "params": jax.tree_util.tree_map_with_path(draw, shapes["params"]),
      "batch_stats": jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype),
                                            shapes["batch_stats"]),
  }
  images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
  numbers = rng.integers(0, 10, 64)
  return jax.device_get(_BATCH_STATS_FN(variables, images, numbers))


def _with_batch_stats(variables: dict, images: jax.Array, numbers: jax.Array) -> dict:
  """`variables` with BatchNorm running statistics := those of this batch."""
  _, updates = MODEL.clone(bn_momentum=0.0).apply(
      variables, model_lib.normalize_images(images), numbers, train=True,
      mutable=["batch_stats"])
  return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


_BATCH_STATS_FN = jax.jit(_with_batch_stats)
_APPLY_FN = jax.jit(functools.partial(MODEL.apply, train=False))


@pytest.fixture(scope="module")
def weight_sets() -> dict:
  return {"final": _variables(0), "swa": _variables(1)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, weight_sets) -> pathlib.Path:
  """A training workdir holding only ``checkpoint/``."""
  wd = tmp_path_factory.mktemp("workdir")
  checkpoint.save(str(wd / "checkpoint"), weight_sets, CONFIG)
  return wd


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


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    np.testing.assert_array_equal(x, y)


# --- checkpoint ----------------------------------------------------------------


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


def _garble_weights(ckpt_dir: pathlib.Path, pattern: str = "*") -> None:
  """Overwrite the weights' files matching `pattern` (not _METADATA) with garbage.

  ``"ocdbt.process_*/d/*"`` hits only array chunks, so that orbax fails while
  reading arrays (after reading the metadata); ``"*"`` also hits the OCDBT
  manifests and the zarr metadata.
  """
  paths = [p for p in (ckpt_dir / "weights").rglob(pattern)
           if p.is_file() and p.name not in ("_METADATA", "commit_success.txt")]
  assert paths, f"no {pattern} in the checkpoint: orbax's layout changed, update this test"
  for path in paths:
    path.write_bytes(b"\xffnot tensorstore data\x00" * 4)


def test_load_refuses_bad_checkpoints(tmp_path, workdir, weight_sets, monkeypatch):
  (tmp_path / "empty").mkdir()
  for name in ("garbled", "truncated_meta"):
    shutil.copytree(workdir / "checkpoint", tmp_path / name)
  _garble_weights(tmp_path / "garbled")
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
  _garble_weights(tmp / "garbled", "ocdbt.process_*/d/*")
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


# --- plots -------------------------------------------------------------------------


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
