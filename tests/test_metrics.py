"""Metrics on hand-made cases."""

import numpy as np
import pytest

from adder.metrics import compute_metrics


def test_joint_accuracy_is_counted_per_case_not_a_product():
  digits = np.array([1, 2, 3, 4])
  numbers = np.array([0, 0, 0, 0])
  # Case 0 both right; case 1 both wrong; cases 2, 3 both right.
  digit_pred = np.array([1, 7, 3, 4])
  sum_pred = np.array([1, 7, 3, 4])
  m = compute_metrics(digit_pred, sum_pred, digits, numbers)
  assert m["digit_acc"] == m["sum_acc"] == 0.75
  assert m["joint_acc"] == 0.75  # the product would claim 0.5625
  assert m["joint_acc"] != m["digit_acc"] * m["sum_acc"]
  assert m["consistency"] == 1.0


def test_errors_on_different_cases():
  digits, numbers = np.array([5, 5, 5, 5]), np.array([1, 2, 3, 4])
  digit_pred = np.array([5, 0, 5, 5])  # case 1 wrong
  sum_pred = np.array([6, 7, 0, 9])  # case 2 wrong
  m = compute_metrics(digit_pred, sum_pred, digits, numbers)
  assert (m["digit_acc"], m["sum_acc"], m["joint_acc"]) == (0.75, 0.75, 0.5)
  # Consistent where sum_pred == digit_pred + number: cases 0 and 3.
  assert m["consistency"] == 0.5


def test_rejects_mismatched_or_empty():
  with pytest.raises(ValueError):
    compute_metrics(np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3))
  with pytest.raises(ValueError):
    compute_metrics(*(np.zeros(0),) * 4)
