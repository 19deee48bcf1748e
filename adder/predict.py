"""Prediction from a checkpoint: image preparation, a batch API, and the CLI.

``python -m adder.predict [CHECKPOINT] IMAGE NUMBER [--json] [--weights {swa,final}]``
prints the digit in IMAGE and the sum digit + NUMBER, each with its softmax
probability. CHECKPOINT is a training workdir or the checkpoint inside it;
without it, the repository's pretrained run (`PRETRAINED`) is used.
Bad input (NUMBER not an integer 0-9, a missing or unreadable image, a
missing, corrupt or incompatible checkpoint) ends with one line on stderr
starting with ``error:`` and exit status 2.

`prepare_image` turns a PNG or JPEG of any size, grey or colour, into MNIST's
form: uint8 (28, 28), white digit on black, prepared the way MNIST was:

1. Pillow opens it and applies its EXIF orientation; transparent pixels are
   laid over white (a digit drawn on a transparent canvas is usually dark).
2. Greyscale (ITU-R 601-2 luma, Pillow's ``"L"``).
3. Polarity. The background is the median of the outermost one-pixel frame
   (the median, so that strokes touching the edge do not sway it). If it is
   nearer the image's lightest pixel than its darkest, i.e. ``background >
   (min + max) / 2``, the image is dark-on-light and is inverted (``255 -
   p``). A fixed ``background > 127`` would misjudge dim photos of paper and
   brightly lit dark boards; percentiles would miss a thin digit that covers
   under 1% of a large image.
4. Levels. Values at or below ``background + 10% of the contrast`` become 0
   (paper texture, JPEG noise) and the brightest pixel becomes 255. An image
   with less than `MIN_CONTRAST` grey levels between background and ink has
   no digit to read and is refused.
5. Crop to the bounding box of the remaining ink, scale it so that its longer
   side is 20 px keeping the aspect ratio (antialiased bilinear), and paste it
   into a black 28x28 canvas (its brightest pixel restored to 255) so that
   its centre of mass (of pixel values) falls on pixel (14, 14), as in MNIST
   (whose test images have their centre of mass at (14.0, 14.0) +- 0.3); the
   shift is clamped so that no ink is cut off.

`load` returns a `Predictor`: called with ``(images, numbers)`` (MNIST form,
uint8 or float in [0, 255], shape (N, 28, 28) or (N, 28, 28, 1); int (N,) in
0..9) it returns ``(digits, sums)``, int32 numpy arrays (N,).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
from PIL import Image, ImageOps

from adder import checkpoint as checkpoint_lib
from adder import model as model_lib
from adder.config import Config

# The checkpoint of the documented default run, committed with its results.json
# and metrics.jsonl: what the CLI uses when it is given no CHECKPOINT.
PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "pretrained")

MNIST_SIZE = 28  # side of the canvas
MNIST_BOX = 20  # longer side of the digit inside it
MNIST_CENTRE = 14.0  # where the centre of mass goes (row and column)
MIN_CONTRAST = 24  # grey levels between background and ink, below: no digit
NOISE_FRACTION = 0.1  # share of the contrast above the background cut as noise


class Predictor:
  """A checkpoint's model and weights, predicting on batches.

  Call it with ``(images, numbers)`` for ``(digits, sums)``; `probabilities`
  gives the softmax outputs. The forward pass is jitted once, at construction
  (it recompiles only for a new batch size).

  Attributes:
    config: the stored training config (rebuilds the model).
    weights: the name of the weight set in use, ``"swa"`` or ``"final"``.
    variables: ``{"params": ..., "batch_stats": ...}`` on the default device.
  """

  def __init__(self, config: Config, variables: dict, weights: str):
    self.config = config
    self.weights = weights
    self.variables = jax.device_put(variables)
    model = model_lib.create_model(config)
    self._forward = jax.jit(functools.partial(_probabilities, model.apply))

  def probabilities(self, images: Any, numbers: Any) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs: float32 (N, 10) over digits and (N, 19) over sums 0..18."""
    images, numbers = _check_batch(images, numbers)
    return jax.device_get(self._forward(self.variables, images, numbers))

  def __call__(self, images: Any, numbers: Any) -> tuple[np.ndarray, np.ndarray]:
    """Predicted digit and sum, int32 (N,) each, for MNIST-form images and integers.

    Args:
      images: uint8 or float pixels in [0, 255], white digit on black, shape
        (N, 28, 28) or (N, 28, 28, 1).
      numbers: int, shape (N,), values 0..9.
    """
    digit_probs, sum_probs = self.probabilities(images, numbers)
    return (np.argmax(digit_probs, -1).astype(np.int32),
            np.argmax(sum_probs, -1).astype(np.int32))


def _probabilities(
    apply_fn: Callable, variables: dict, images: jax.Array, numbers: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Eval-mode forward pass -> softmax of the two heads, (N, 10) and (N, 19)."""
  digit_logits, sum_logits = apply_fn(
      variables, model_lib.normalize_images(images), numbers, train=False)
  return jax.nn.softmax(digit_logits), jax.nn.softmax(sum_logits)


def _check_batch(images: Any, numbers: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validated host arrays: images float32 (N, 28, 28, 1) in [0, 255], numbers int32 (N,)."""
  images = np.asarray(images)
  numbers = np.asarray(numbers)
  shape_ok = (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1))
  if not shape_ok or images.shape[1:3] != (MNIST_SIZE, MNIST_SIZE):
    raise ValueError(f"images must have shape (N, 28, 28) or (N, 28, 28, 1), got {images.shape}")
  if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
    raise ValueError(f"images must be uint8 or float pixels in [0, 255], got {images.dtype}")
  if numbers.shape != images.shape[:1] or not np.issubdtype(numbers.dtype, np.integer):
    raise ValueError(f"numbers must be ints of shape ({images.shape[0]},), got "
                     f"{numbers.dtype} {numbers.shape}")
  if numbers.size and (numbers.min() < 0 or numbers.max() > 9):
    raise ValueError("numbers must be in 0..9")
  # One dtype and layout whatever the caller passes: one compilation per batch size.
  images_NHWC = images.astype(np.float32).reshape(-1, MNIST_SIZE, MNIST_SIZE, 1)
  return images_NHWC, numbers.astype(np.int32)


def load(checkpoint: str, weights: Optional[str] = None) -> Predictor:
  """A `Predictor` for a training workdir or a checkpoint directory.

  Args:
    checkpoint: the workdir of ``python -m adder.train`` or its ``checkpoint/``.
    weights: ``"swa"`` or ``"final"``; None takes ``"swa"`` when present.

  Raises:
    adder.checkpoint.CheckpointError: missing, corrupt or incompatible
      checkpoint, or no weight set of that name.
  """
  config, weight_sets = checkpoint_lib.load(checkpoint)
  if weights is None:
    weights = checkpoint_lib.preferred_weights(weight_sets)
  if weights not in weight_sets:
    raise checkpoint_lib.CheckpointError(
        f"the checkpoint has no {weights!r} weights (it has {sorted(weight_sets)})")
  return Predictor(config, weight_sets[weights], weights)


def _open_image(image: Union[str, os.PathLike, Image.Image]) -> Image.Image:
  """A decoded Pillow image; ValueError with a one-line reason if unreadable."""
  if isinstance(image, Image.Image):
    return image
  try:
    with Image.open(image) as img:
      img.load()  # decode now: a truncated file fails here, not later
      return ImageOps.exif_transpose(img)
  except FileNotFoundError as e:
    raise ValueError(f"image not found: {image}") from e
  except IsADirectoryError as e:
    raise ValueError(f"image is a directory: {image}") from e
  except Image.UnidentifiedImageError as e:
    raise ValueError(f"not an image Pillow can read: {image}") from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {image}: {e}") from e


def _to_grey(img: Image.Image) -> np.ndarray:
  """float32 (H, W) luma in [0, 255]; transparency laid over white."""
  if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float greys
    arr = np.asarray(img.convert("F"), np.float32)
    top = 65535.0 if img.mode != "F" and arr.max() > 255 else 255.0
    return np.clip(arr * (255.0 / top), 0, 255)
  return np.asarray(img.convert("L"), np.float32)


def _border_median(x: np.ndarray) -> float:
  frame = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
  return float(np.median(frame))


def prepare_image(image: Union[str, os.PathLike, Image.Image]) -> np.ndarray:
  """A PNG/JPEG (path or Pillow image) -> MNIST form, uint8 (28, 28), white on black.

  See the module docstring for the steps and the dark-on-light rule.

  Raises:
    ValueError: the file is missing or not a readable image, or it shows no
      digit (uniform, or less than `MIN_CONTRAST` grey levels of contrast).
  """
  x = _to_grey(_open_image(image))
  if x.size == 0:
    raise ValueError("the image is empty")

  background = _border_median(x)
  if background > (float(x.min()) + float(x.max())) / 2:  # dark ink on light: invert
    x = 255.0 - x
    background = 255.0 - background

  contrast = float(x.max()) - background
  if contrast < MIN_CONTRAST:
    raise ValueError(f"no digit found: the image is nearly uniform "
                     f"(contrast {contrast:.0f} < {MIN_CONTRAST} grey levels)")
  floor = background + NOISE_FRACTION * contrast
  x = np.clip((x - floor) / (float(x.max()) - floor), 0.0, 1.0) * 255.0

  rows = np.flatnonzero(x.max(axis=1) > 0)
  cols = np.flatnonzero(x.max(axis=0) > 0)
  x = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

  h, w = x.shape
  scale = MNIST_BOX / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))  # Pillow: (width, height)
  digit = Image.fromarray(x.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
  digit = np.clip(np.asarray(digit, np.float32), 0.0, None)
  digit *= 255.0 / digit.max()  # thin strokes lose their peak in the resize

  h, w = digit.shape
  mass = digit.sum()
  cy = (digit.sum(axis=1) * np.arange(h)).sum() / mass
  cx = (digit.sum(axis=0) * np.arange(w)).sum() / mass
  top = int(np.clip(round(MNIST_CENTRE - cy), 0, MNIST_SIZE - h))
  left = int(np.clip(round(MNIST_CENTRE - cx), 0, MNIST_SIZE - w))
  canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
  canvas[top:top + h, left:left + w] = digit
  return np.round(canvas).astype(np.uint8)


# --- command line ---


class OneLineErrorParser(argparse.ArgumentParser):
  """argparse, but a usage error is one ``error:`` line (exit 2), no usage dump."""

  def error(self, message: str):
    self.exit(2, f"error: {message} (see --help)\n")


def _parse_number(text: str) -> int:
  if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
    raise ValueError(f"NUMBER must be an integer 0-9, got {text!r}")
  number = int(text)
  if not 0 <= number <= 9:
    raise ValueError(f"NUMBER must be an integer 0-9, got {number}")
  return number


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = OneLineErrorParser(
      prog="python -m adder.predict",
      description="Read the digit in an image and add an integer to it, with a trained "
                  "adder checkpoint. The image is converted to MNIST's form first "
                  "(greyscale, white on black, digit fitted into 20x20 and centred by "
                  "mass in 28x28; dark-on-light images are inverted).")
  p.usage = "%(prog)s [-h] [--json] [--weights {swa,final}] [CHECKPOINT] IMAGE NUMBER"
  p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGE NUMBER",
                 help="CHECKPOINT: a training workdir (its checkpoint/ is used) or the "
                      f"checkpoint itself; without it, the pretrained run in {PRETRAINED}. "
                      "IMAGE: PNG or JPEG of one digit, any size, grey or colour. "
                      "NUMBER: the integer to add, 0-9")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object with keys digit, sum, digit_prob, sum_prob")
  p.add_argument("--weights", choices=checkpoint_lib.WEIGHT_SETS, default=None,
                 help="weight set to use (default: swa when the checkpoint has it, else final)")
  args = p.parse_args(argv)
  if len(args.inputs) not in (2, 3):
    p.error(f"expected [CHECKPOINT] IMAGE NUMBER, got {len(args.inputs)} arguments")
  args.checkpoint = args.inputs[0] if len(args.inputs) == 3 else PRETRAINED
  args.image, args.number = args.inputs[-2:]
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; returns the exit status (0, or 2 after one ``error:`` line)."""
  args = parse_args(argv)
  try:
    number = _parse_number(args.number)
    image = prepare_image(args.image)
    predictor = load(args.checkpoint, args.weights)
  except (ValueError, checkpoint_lib.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2

  digit_probs, sum_probs = predictor.probabilities(image[None], np.array([number]))
  digit, total = int(np.argmax(digit_probs[0])), int(np.argmax(sum_probs[0]))
  result = {"digit": digit, "sum": total,
            "digit_prob": float(digit_probs[0, digit]), "sum_prob": float(sum_probs[0, total])}
  if args.json:
    print(json.dumps(result))
  else:
    print(f"digit: {digit:<3d} (probability {result['digit_prob']:.4f})")
    print(f"sum:   {total:<3d} (probability {result['sum_prob']:.4f})  "
          f"[digit + {number}; {predictor.weights} weights]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
