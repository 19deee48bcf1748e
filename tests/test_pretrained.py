"""The committed pretrained run: its checkpoint, re-evaluated against its own results.json.

`pretrained/` holds the checkpoint of the default recipe's seed-0 run with its
``results.json`` and ``metrics.jsonl``; `python -m adder.predict IMAGE
NUMBER` uses it when given no checkpoint. The re-evaluation needs the real
MNIST test set (prepared once per session by the `prepared_mnist` fixture).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adder import checkpoint
from adder import data as data_lib
from adder import metrics as metrics_lib
from adder import predict
from adder.config import Config, run_differences
from conftest import REPO

PRETRAINED = REPO / "pretrained"


def _results() -> dict:
  with open(PRETRAINED / "results.json") as f:
    return json.load(f)


def test_pretrained_is_the_default_recipe_and_predict_uses_it():
  assert predict.PRETRAINED == str(PRETRAINED)
  config, weight_sets = checkpoint.load(str(PRETRAINED))
  assert run_differences(config, Config()) == {}, "pretrained/ is not the default recipe"
  assert set(weight_sets) == {"final", "swa"}
  results = _results()
  assert Config.from_dict(results["config"]) == config
  with open(PRETRAINED / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["epoch"] for r in rows] == list(range(1, config.epochs + 1))


@pytest.mark.parametrize("weights", ["final", "swa"])
def test_pretrained_scores_what_its_results_json_says(prepared_mnist, weights):
  dataset = data_lib.read_mnist(prepared_mnist)
  images, labels = dataset["test_images"], dataset["test_labels"]
  predictor = predict.load(str(PRETRAINED), weights)
  # Every test image with every integer: the exhaustive set, one integer at a time.
  numbers = np.repeat(np.arange(10, dtype=np.int32), len(labels))
  preds = [predictor(images, np.full(len(labels), k, np.int32)) for k in range(10)]
  digit_pred, sum_pred = (np.concatenate(p) for p in zip(*preds))
  scores = metrics_lib.compute_metrics(digit_pred, sum_pred, np.tile(labels, 10), numbers)
  recorded = _results()[weights]["exhaustive"]
  # Evaluated here on one device, in batches of another size than in training:
  # float sums in another order may move a case that sits on a decision
  # boundary. At most 2 of the 100,000 cases may differ.
  for name in ("digit_acc", "sum_acc", "joint_acc"):
    assert abs(scores[name] - recorded[name]) <= 2e-5, (name, scores[name], recorded[name])


def test_predict_cli_without_a_checkpoint_uses_the_pretrained_run(prepared_mnist, tmp_path):
  dataset = data_lib.read_mnist(prepared_mnist)
  image, digit = dataset["test_images"][0], int(dataset["test_labels"][0])
  Image.fromarray(image).save(tmp_path / "digit.png")
  r = subprocess.run([sys.executable, "-m", "adder.predict", str(tmp_path / "digit.png"),
                      "3", "--json"], cwd=tmp_path, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["digit"] == digit and out["sum"] == digit + 3
