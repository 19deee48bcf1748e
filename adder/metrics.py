"""Accuracy metrics of the two heads, counted per case.

Joint accuracy is the share of cases where *both* outputs are right. It is not
the product of the two accuracies (the original's measure), which is only right
when the heads err independently. They do not: a misread digit usually makes
the sum wrong too, so errors overlap, and the product then under-counts the
cases where both are right. Only the per-case count is a measurement.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("digit_acc", "sum_acc", "joint_acc", "consistency", "sum_given_digit")


def compute_metrics(
    digit_pred: np.ndarray,
    sum_pred: np.ndarray,
    digits: np.ndarray,
    numbers: np.ndarray,
) -> dict[str, float]:
  """Accuracies over N cases. All arguments are int arrays of shape (N,).

  Returns:
    ``digit_acc``: share with ``digit_pred == digit``;
    ``sum_acc``: share with ``sum_pred == digit + number``;
    ``joint_acc``: share with both right;
    ``consistency``: share with ``sum_pred == digit_pred + number`` (the two
    heads agree, right or wrong);
    ``sum_given_digit``: among the cases with the digit right, the share with
    the sum right too (1.0 when the adder part is exact; NaN if no digit is
    right). Each a float in [0, 1].
  """
  digit_pred, sum_pred, digits, numbers = (
      np.asarray(a).astype(np.int64) for a in (digit_pred, sum_pred, digits, numbers))
  if not digit_pred.shape == sum_pred.shape == digits.shape == numbers.shape:
    raise ValueError("all arrays must have the same shape (N,)")
  if digits.size == 0:
    raise ValueError("no cases to score")
  digit_ok = digit_pred == digits
  sum_ok = sum_pred == digits + numbers
  return {
      "digit_acc": float(digit_ok.mean()),
      "sum_acc": float(sum_ok.mean()),
      "joint_acc": float((digit_ok & sum_ok).mean()),
      "consistency": float((sum_pred == digit_pred + numbers).mean()),
      "sum_given_digit": float(sum_ok[digit_ok].mean()) if digit_ok.any() else float("nan"),
  }


def joint_by_number(
    digit_pred: np.ndarray,
    sum_pred: np.ndarray,
    digits: np.ndarray,
    numbers: np.ndarray,
) -> list[float]:
  """Joint accuracy among the cases of each integer 0..9: a list of 10 floats.

  Arguments as `compute_metrics`'. An integer with no case gets NaN.
  """
  digit_pred, sum_pred, digits, numbers = (
      np.asarray(a).astype(np.int64) for a in (digit_pred, sum_pred, digits, numbers))
  joint = (digit_pred == digits) & (sum_pred == digits + numbers)
  return [float(joint[numbers == k].mean()) if (numbers == k).any() else float("nan")
          for k in range(10)]


def epoch_line(row: dict, epochs: int) -> str:
  """The line ``python -m adder.train`` prints after an epoch, from its metrics row.

  Args: a row of ``metrics.jsonl`` (rows saved before the test-pair loss was
    logged have no ``test_loss``, and print without it); the run's epoch count.
  """
  test_loss = f"test loss {row['test_loss']:.4f} " if "test_loss" in row else "test "
  return (f"epoch {row['epoch']:2d}/{epochs}  loss {row['train_loss']:.4f}  {test_loss}"
          f"digit {row['test_digit_acc']:.4f} sum {row['test_sum_acc']:.4f} joint "
          f"{row['test_joint_acc']:.4f}  lr {row['lr']:.5f}  {row['seconds']:.1f}s")


def final_line(name: str, test: dict, exhaustive: dict) -> str:
  """The line ``python -m adder.train`` prints for a weight set's final scores.

  Args: the weight set (``"final"``, ``"swa"``); its scores on the test pairs
    and the exhaustive set (``sum_given_digit`` printed where present).
  """
  sum_given_digit = (f" sum|digit {exhaustive['sum_given_digit']:.4f}"
                     if "sum_given_digit" in exhaustive else "")
  return (f"{name:5s}  test joint {test['joint_acc']:.4f}  exhaustive: digit "
          f"{exhaustive['digit_acc']:.4f} sum {exhaustive['sum_acc']:.4f} joint "
          f"{exhaustive['joint_acc']:.4f} consistency {exhaustive['consistency']:.4f}"
          f"{sum_given_digit}")
