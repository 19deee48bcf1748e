"""Evaluation: the weight sets to score, and their scores on fixed pairs.

The test set is scored on two sets of (image, integer) cases, both fixed: the
seeded pairs (each test image once, its integer from ``Config.eval_seed``) and
the exhaustive set (each test image with each integer 0-9, 100,000 cases).
`eval_step` predicts a chunk in one jitted call; `evaluate` feeds it chunks
and computes the metrics of `adder.metrics` on the host.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from adder import data as data_lib
from adder import distributed
from adder import losses
from adder import metrics as metrics_lib
from adder import model as model_lib
from adder import optim

# ``evaluate_fn(variables, image_index, numbers) -> (scores, (digit_pred, sum_pred))``:
# `evaluate` with its eval step, images and labels bound.
Evaluate = Callable[..., tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]]


def eval_step(
    apply_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    image_index: jax.Array,
    numbers: jax.Array,
    digits: jax.Array,
    *,
    consistency_weight: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Predictions and losses for the cases (image_index[b], numbers[b]) of digit digits[b].

  Eval mode (running BatchNorm statistics). Jit it with ``apply_fn`` and
  ``consistency_weight`` static; `evaluate` feeds it fixed-size chunks.

  Returns:
    ``(digit_pred, sum_pred, loss)``: int32 (B,) predictions, and float32 (B,)
    each case's training loss (`adder.losses.case_losses`).
  """
  digit_logits, sum_logits = apply_fn(
      variables, model_lib.normalize_images(images_u8[image_index]), numbers, train=False)
  loss = losses.case_losses(digit_logits, sum_logits, digits, numbers, consistency_weight)
  return (jnp.argmax(digit_logits, -1).astype(jnp.int32),
          jnp.argmax(sum_logits, -1).astype(jnp.int32), loss)


def evaluate(
    eval_fn: Callable,
    variables: dict,
    images_u8: jax.Array,
    labels: np.ndarray,
    image_index: np.ndarray,
    numbers: np.ndarray,
    batch_size: int,
    sharding: Optional[NamedSharding] = None,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
  """Metrics (see `adder.metrics`), the mean loss and host predictions over fixed cases.

  The cases go through ``eval_fn`` (a jitted `eval_step`) in chunks of
  ``batch_size``, the last one padded so that it compiles once. With a
  ``sharding``, each chunk is split along it (its size must divide).

  Returns:
    ``(scores, (digit_pred, sum_pred))``: the metrics plus ``loss`` (the mean
    over the cases of the training loss, in eval mode), and int32 (N,)
    predictions.
  """
  m = len(image_index)
  pad = -m % batch_size
  chunks = [np.pad(x, (0, pad)).reshape(-1, batch_size)
            for x in (image_index, numbers, labels[image_index])]
  if sharding is not None:
    chunks = [distributed.shard(list(x), sharding) for x in chunks]
  outs = [eval_fn(variables, images_u8, *chunk) for chunk in zip(*chunks)]
  digit_pred, sum_pred, loss = (np.concatenate(x)[:m] for x in zip(*distributed.to_host(outs)))
  scores = metrics_lib.compute_metrics(digit_pred, sum_pred, labels[image_index], numbers)
  scores["loss"] = float(np.mean(loss, dtype=np.float64))
  return scores, (digit_pred, sum_pred)


def final_weight_sets(
    state: Any, plain_batch_stats: Callable[[Any], Any], recompute_final: bool
) -> dict[str, dict]:
  """``final`` (the last iterate) and, with SWA, ``swa`` (the averaged parameters).

  Args:
    state: a trained `adder.step.TrainState`.
    plain_batch_stats: ``params -> batch_stats`` over the plain training
      images (`adder.batch_norm.plain_batch_stats` with its data bound).
    recompute_final: whether the final parameters get plain statistics too
      (`Config.recomputes_final_batch_stats`) instead of their running ones.

  Returns:
    ``{name: {"params": ..., "batch_stats": ...}}``; the ``swa`` parameters
    always get `plain_batch_stats`.
  """
  final_stats = plain_batch_stats(state.params) if recompute_final else state.batch_stats
  weight_sets = {"final": {"params": state.params, "batch_stats": final_stats}}
  swa = optim.swa_state(state.opt_state)
  if swa is not None and int(swa.n_averaged) > 0:
    weight_sets["swa"] = {"params": swa.mean, "batch_stats": plain_batch_stats(swa.mean)}
  return weight_sets


def final_evaluation(
    evaluate_fn: Evaluate,
    test_labels: np.ndarray,
    weight_sets: dict[str, dict],
    test_pairs: tuple[np.ndarray, np.ndarray],
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Scores of each weight set on the test pairs and the exhaustive set.

  Args:
    evaluate_fn: `evaluate` over the test images, ``(variables, image_index,
      numbers)`` left to give.
    test_labels: int32 (N,), the test images' digits.
    weight_sets: see `final_weight_sets`.
    test_pairs: ``(image_index, numbers)``, int32 (N,) each: the seeded pairs.

  Returns:
    ``({name: {"test": scores, "exhaustive": scores}}, {name: (digit_pred,
    sum_pred) on the test pairs}``; the exhaustive scores also hold
    ``joint_acc_by_number``, the joint accuracy for each integer 0..9.
  """
  ex_pairs = data_lib.exhaustive_pairs(test_labels.shape[0])
  results, test_preds = {}, {}
  for name, variables in weight_sets.items():
    test_scores, test_preds[name] = evaluate_fn(
        variables, image_index=test_pairs[0], numbers=test_pairs[1])
    ex_scores, ex_preds = evaluate_fn(variables, image_index=ex_pairs[0], numbers=ex_pairs[1])
    ex_scores["joint_acc_by_number"] = metrics_lib.joint_by_number(
        *ex_preds, test_labels[ex_pairs[0]], ex_pairs[1])
    results[name] = {"test": test_scores, "exhaustive": ex_scores}
    distributed.log(metrics_lib.final_line(name, test_scores, ex_scores))
  return results, test_preds
