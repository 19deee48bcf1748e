"""PNG plots of a training run, written into its workdir (matplotlib, Agg).

`write_all` writes ``loss.png`` (train and test loss per epoch), ``accuracy.png`` (test
digit / sum / joint accuracy per epoch), ``lr.png`` (learning rate per epoch),
``samples.png`` (test pairs with the truth beside the prediction: the first
cases and some wrong ones, in red), ``mistakes.png`` (the test pairs with a
wrong digit or sum, with the truth and the prediction) and ``confusion.png``
(the digit head's confusion matrix, in counts). The figures drawn from a
weight set name it (``weights``) with the split and the counts.
`plot_lr_find` draws the learning-rate range test of `adder.lr_find`
(``lr_find.png``).
Each plot is one function taking plain arrays and an output path. Figures are
built with matplotlib's object API (`matplotlib.figure.Figure`, rendered by
Agg), not pyplot: no global state, no display, and importing this module does
not change the backend of a notebook.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

NUM_SAMPLES = 32  # test pairs in samples.png
NUM_SAMPLE_MISTAKES = 8  # of which, at most this many wrong ones after the first cases
NUM_MISTAKES = 40  # wrong cases in mistakes.png
SAMPLE_COLUMNS = 8
DPI = 120


def new_figure(**kwargs) -> Figure:
  """A matplotlib Figure rendered by Agg, whatever pyplot's backend is."""
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is
  return fig


def save(fig: Figure, path: str) -> str:
  """Write `fig` as a PNG at `path` (`DPI`, cropped to its content); returns `path`."""
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  return path


def _column(history: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  epochs = np.asarray([row["epoch"] for row in history])
  return epochs, np.asarray([row[key] for row in history], np.float64)


def plot_loss(history: Sequence[dict], path: str) -> str:
  """The training loss (`adder.step.train_step`'s objective) per epoch, log scale.

  The mean over the epoch's training steps and, where the rows have
  ``test_loss``, the loss on the test pairs after the epoch (eval mode).
  """
  fig = new_figure(figsize=(6, 4))
  ax = fig.subplots()
  curves = [_column(history, "train_loss")]
  ax.plot(*curves[0], marker="o", label="train (mean over the epoch)")
  if all("test_loss" in row for row in history):
    curves.append(_column(history, "test_loss"))
    ax.plot(*curves[1], marker="o", label="test pairs (after the epoch)")
  if all(np.all(loss > 0) for _, loss in curves):
    ax.set_yscale("log")
  ax.set(xlabel="epoch", ylabel="loss",
         title="Loss (the training objective) per epoch, weights being trained")
  ax.grid(True, alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
  ax.legend()
  return save(fig, path)


def plot_accuracy(history: Sequence[dict], path: str) -> str:
  """Digit, sum and joint accuracy on the test pairs after each epoch.

  Those of the weights being trained at the end of the epoch (not the SWA
  average), as ``metrics.jsonl`` records them.
  """
  fig = new_figure(figsize=(6, 4))
  ax = fig.subplots()
  for key, label in (("test_digit_acc", "digit"), ("test_sum_acc", "sum"),
                     ("test_joint_acc", "joint (both right)")):
    epochs, acc = _column(history, key)
    ax.plot(epochs, 100 * acc, marker="o", label=label)
  ax.set(xlabel="epoch", ylabel="test accuracy (%)",
         title="Accuracy on the test pairs after each epoch, weights being trained")
  ax.grid(True, alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
  ax.legend()
  return save(fig, path)


def plot_lr(history: Sequence[dict], path: str) -> str:
  """Learning rate at the end of each epoch."""
  fig = new_figure(figsize=(6, 4))
  ax = fig.subplots()
  epochs, lr = _column(history, "lr")
  ax.plot(epochs, lr, marker="o")
  ax.set(xlabel="epoch", ylabel="learning rate", title="Learning rate (one-cycle)")
  ax.grid(True, alpha=0.3)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
  return save(fig, path)


def _image_grid(images: np.ndarray, indices, row_height: float):
  """A figure of `SAMPLE_COLUMNS`-wide rows showing ``images[indices]``, axes off.

  Returns the figure and its axes in order, the first ``len(indices)`` holding
  the images (at least one row, so an empty selection still draws).
  """
  rows = max(1, -(-len(indices) // SAMPLE_COLUMNS))
  fig = new_figure(figsize=(1.6 * SAMPLE_COLUMNS, row_height * rows))
  axes = list(fig.subplots(rows, SAMPLE_COLUMNS, squeeze=False).flat)
  for ax in axes:
    ax.axis("off")
  for ax, i in zip(axes, indices):
    ax.imshow(np.asarray(images[i]).reshape(28, 28), cmap="gray", vmin=0, vmax=255)
  return fig, axes


def _weights_label(weights: Optional[str]) -> str:
  """``"SWA weights, "`` / ``"final weights, "`` for a title, or nothing when unknown."""
  return f"{'SWA' if weights == 'swa' else weights} weights, " if weights else ""


def select_samples(labels: np.ndarray, numbers: np.ndarray, digit_pred: np.ndarray,
                   sum_pred: np.ndarray, num: int = NUM_SAMPLES,
                   num_wrong: int = NUM_SAMPLE_MISTAKES) -> np.ndarray:
  """Indices, int (min(num, N),) ascending, of the cases `plot_samples` shows.

  The first wrong cases (at most `num_wrong`), and the first cases in order
  for the rest: a picture of what the model usually does that also shows how
  it fails, whatever its accuracy.
  """
  n = min(num, len(labels))
  wrong = mistakes(labels, numbers, digit_pred, sum_pred)[:min(num_wrong, n)]
  first = np.setdiff1d(np.arange(len(labels)), wrong)[:n - len(wrong)]
  return np.sort(np.concatenate([first, wrong])).astype(np.int64)


def plot_samples(
    images: np.ndarray,
    labels: np.ndarray,
    numbers: np.ndarray,
    digit_pred: np.ndarray,
    sum_pred: np.ndarray,
    path: str,
    weights: Optional[str] = None,
) -> str:
  """Test pairs (`select_samples`), each titled ``#i  7 + 3`` over its answer.

  A right answer reads ``d 7  s 10``; a wrong one, in red, gives the truth
  beside the prediction, ``d 7→1  s 10→4`` (true → predicted digit d and sum s).

  Args:
    images: uint8 (N, 28, 28); labels, numbers, digit_pred, sum_pred: int (N,).
    weights: the weight set that predicted (``"swa"``/``"final"``), for the title.
  """
  shown = select_samples(labels, numbers, digit_pred, sum_pred)
  wrong = mistakes(labels, numbers, digit_pred, sum_pred)
  fig, axes = _image_grid(images, shown, row_height=1.9)
  for i, ax in zip(shown, axes):
    d, s = labels[i], labels[i] + numbers[i]
    right = digit_pred[i] == d and sum_pred[i] == s
    answer = (f"d {d}  s {s}" if right else f"d {d}→{digit_pred[i]}  s {s}→{sum_pred[i]}")
    ax.set_title(f"#{i}  {d} + {numbers[i]}\n{answer}", fontsize=8,
                 color="black" if right else "red")
  num_shown_wrong = int(np.isin(shown, wrong).sum())
  fig.suptitle(
      f"Test pairs, {_weights_label(weights)}{len(shown) - num_shown_wrong} right and "
      f"{num_shown_wrong} wrong ({len(wrong):,} of {len(labels):,} wrong in all)\n"
      "#index  digit + integer; d digit, s sum as predicted; in red, wrong: true→predicted")
  return save(fig, path)


def mistakes(labels: np.ndarray, numbers: np.ndarray, digit_pred: np.ndarray,
             sum_pred: np.ndarray) -> np.ndarray:
  """Indices, int (M,) ascending, of the cases whose digit or sum is wrong."""
  labels, numbers = np.asarray(labels), np.asarray(numbers)
  return np.flatnonzero((np.asarray(digit_pred) != labels)
                        | (np.asarray(sum_pred) != labels + numbers))


def plot_mistakes(
    images: np.ndarray,
    labels: np.ndarray,
    numbers: np.ndarray,
    digit_pred: np.ndarray,
    sum_pred: np.ndarray,
    path: str,
    weights: Optional[str] = None,
) -> str:
  """The first `NUM_MISTAKES` wrong cases, each titled ``#i n=3`` / ``d 7→1 s 10→4``.

  ``d`` and ``s`` give the true digit and sum, then the predicted ones; the
  suptitle counts all the wrong cases.

  Args:
    images: uint8 (N, 28, 28); labels, numbers, digit_pred, sum_pred: int (N,).
    weights: the weight set that predicted (``"swa"``/``"final"``), for the title.
  """
  wrong = mistakes(labels, numbers, digit_pred, sum_pred)
  shown = wrong[:NUM_MISTAKES]
  titles = [f"#{i} n={numbers[i]}\nd {labels[i]}→{digit_pred[i]} "
            f"s {labels[i] + numbers[i]}→{sum_pred[i]}" for i in shown]
  return plot_gallery(images, shown, titles,
                      f"Wrong test pairs, {_weights_label(weights)}{len(wrong):,} of "
                      f"{len(labels):,} (the first {len(shown)}); true → predicted digit d "
                      "and sum s, integer n", path)


def plot_gallery(images: np.ndarray, indices, titles: Sequence[str], suptitle: str,
                 path: str) -> str:
  """``images[indices]`` in rows, each under its title (one or two lines) in red.

  Args: images uint8 (N, 28, 28); indices int (M,); M titles.
  """
  fig, axes = _image_grid(images, indices, row_height=1.9)
  for ax, title in zip(axes, titles):
    ax.set_title(title, fontsize=7, color="red")
  fig.suptitle(suptitle)
  return save(fig, path)


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int = 10) -> np.ndarray:
  """int64 (num_classes, num_classes): row = true class, column = predicted."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(pred, np.int64)), 1)
  return counts


def plot_confusion(labels: np.ndarray, digit_pred: np.ndarray, path: str,
                   weights: Optional[str] = None) -> str:
  """The digit head's 10x10 confusion matrix with counts (log colour scale).

  Args:
    labels, digit_pred: int (N,) over the N test images.
    weights: the weight set that predicted (``"swa"``/``"final"``), for the title.
  """
  counts = confusion_matrix(labels, digit_pred)
  fig = new_figure(figsize=(6.5, 5.5))
  ax = fig.subplots()
  im = ax.imshow(np.log1p(counts), cmap="Blues")
  threshold = np.log1p(counts).max() / 2
  for t in range(10):
    for p in range(10):
      if counts[t, p]:
        ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7,
                color="white" if np.log1p(counts[t, p]) > threshold else "black")
  ax.set(xticks=range(10), yticks=range(10), xlabel="predicted digit", ylabel="true digit",
         title=(f"Digit head confusion, {_weights_label(weights)}test images\n"
                f"({int(np.trace(counts)):,} of {int(counts.sum()):,} right)"))
  fig.colorbar(im, ax=ax, label="log(1 + count)")
  return save(fig, path)


def write_all(
    workdir: str,
    history: Sequence[dict],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    test_numbers: np.ndarray,
    digit_pred: np.ndarray,
    sum_pred: np.ndarray,
    weights: Optional[str] = None,
) -> list[str]:
  """Write the six PNGs into `workdir`; returns their paths.

  Args:
    history: one dict per epoch with ``epoch``, ``train_loss``,
      ``test_digit_acc``, ``test_sum_acc``, ``test_joint_acc`` and ``lr``, and
      optionally ``test_loss``.
    test_images: uint8 (N, 28, 28); test_labels, test_numbers: int (N,).
    digit_pred, sum_pred: int (N,), predictions of the weights in the checkpoint.
    weights: which weights predicted (``"swa"``/``"final"``, as
      `adder.checkpoint.preferred_weights` names them), named in the titles.
  """
  os.makedirs(workdir, exist_ok=True)
  out = lambda name: os.path.join(workdir, name)
  return [
      plot_loss(history, out("loss.png")),
      plot_accuracy(history, out("accuracy.png")),
      plot_lr(history, out("lr.png")),
      plot_samples(test_images, test_labels, test_numbers, digit_pred, sum_pred,
                   out("samples.png"), weights),
      plot_mistakes(test_images, test_labels, test_numbers, digit_pred, sum_pred,
                    out("mistakes.png"), weights),
      plot_confusion(test_labels, digit_pred, out("confusion.png"), weights),
  ]


def plot_lr_find(
    lrs: np.ndarray,
    losses: np.ndarray,
    smoothed: np.ndarray,
    suggestion: Optional[int],
    path: str,
    reference_lr: Optional[float] = None,
) -> str:
  """Loss against learning rate (log x) of a range test, the suggestion marked.

  Args:
    lrs: float (K,) increasing, each step's learning rate.
    losses: float (K,) each step's training loss, drawn faint.
    smoothed: float (K,) the smoothed loss, the curve the suggestion is read on.
    suggestion: index into the curve of the suggested learning rate, or None.
    reference_lr: drawn as a dashed vertical line (the recipe's peak lr), or None.
  """
  fig = new_figure(figsize=(6.5, 4))
  ax = fig.subplots()
  ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss per step")
  ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
  if suggestion is not None:
    ax.plot(lrs[suggestion], smoothed[suggestion], "o", color="red", markersize=8,
            label=f"suggested lr {lrs[suggestion]:.3g} (steepest descent)")
  if reference_lr is not None:
    ax.axvline(reference_lr, color="C2", linestyle="--",
               label=f"peak lr of the recipe ({reference_lr:g})")
  ax.set_xscale("log")
  finite = smoothed[np.isfinite(smoothed)]
  if finite.size:  # raw losses past divergence would squash the curve
    ax.set_ylim(0, 1.05 * finite.max())
  ax.set(xlabel="learning rate", ylabel="training loss",
         title="Learning-rate range test")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return save(fig, path)
