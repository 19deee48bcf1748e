"""A sample digit image for `python -m adder.predict`, made from an MNIST test image.

Command (from the repository root; what produced examples/seven.png, the
test split's image #4 in TFDS's record order, a 7):

  python experiments/sample_digit.py --index 4 --out examples/seven.png

The image is written as a scan of a handwritten digit would look: dark ink on
white paper (MNIST's pixels inverted), enlarged 4x with bilinear resampling
to 112x112, greyscale PNG. `adder.predict` turns it back into MNIST's form
(inverts it, crops, scales and centres the digit), so the example exercises
that preparation too.
"""

from __future__ import annotations

import argparse
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from adder import data as data_lib  # noqa: E402

SCALE = 4


def as_scan(image: np.ndarray, scale: int = SCALE) -> Image.Image:
  """uint8 (28, 28) white-on-black -> greyscale PIL image (28·scale)², dark on light."""
  ink = Image.fromarray(255 - np.asarray(image, np.uint8))  # 2-D uint8: mode "L"
  return ink.resize((ink.width * scale, ink.height * scale), Image.BILINEAR)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python experiments/sample_digit.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--index", type=int, required=True, help="test image, in TFDS's order")
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--mnist-dir", default=None, help="as for adder.train")
  p.add_argument("--data-dir", default=None, help="as for adder.train")
  a = p.parse_args(argv)
  try:
    dataset = data_lib.load_mnist(a.mnist_dir, a.data_dir)
  except data_lib.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  images, labels = dataset["test_images"], dataset["test_labels"]
  if not 0 <= a.index < len(images):
    print(f"error: --index must be in 0..{len(images) - 1}, got {a.index}", file=sys.stderr)
    return 2
  try:
    as_scan(images[a.index]).save(a.out, optimize=True)
  except OSError as e:
    print(f"error: cannot write {a.out}: {e}", file=sys.stderr)
    return 2
  print(f"test image #{a.index}, label {labels[a.index]}: {a.out} "
        f"({os.path.getsize(a.out):,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
