"""Metrics on hand-made cases."""

import numpy as np
import pytest

from adder.metrics import compute_metrics, joint_by_number


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


def test_sum_given_digit_and_joint_by_number():
  digits = np.array([1, 2, 3, 4, 5, 6])
  numbers = np.array([0, 0, 1, 1, 2, 9])
  digit_pred = np.array([1, 2, 3, 0, 5, 6])  # case 3 misread
  sum_pred = np.array([1, 3, 4, 5, 7, 15])  # case 1 adds wrongly
  m = compute_metrics(digit_pred, sum_pred, digits, numbers)
  # Five digits right; of those, all sums right but case 1's.
  assert m["sum_given_digit"] == pytest.approx(4 / 5)
  by_number = joint_by_number(digit_pred, sum_pred, digits, numbers)
  assert by_number[0] == 0.5 and by_number[1] == 0.5 and by_number[2] == 1.0
  assert by_number[9] == 1.0 and all(np.isnan(by_number[k]) for k in range(3, 9))


def test_sum_given_digit_without_a_right_digit_is_nan():
  m = compute_metrics(np.array([0]), np.array([0]), np.array([1]), np.array([0]))
  assert np.isnan(m["sum_given_digit"])
