"""adder: a pure-functional JAX/Flax MNIST adder.

Two inputs (an MNIST image and an integer 0-9), two outputs (the digit in the
image, 10 classes; the digit plus the integer, 19 classes).
"""

__version__ = "0.1.0"
