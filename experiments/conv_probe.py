"""Epoch time of `adder.train.train_epoch` with the model's convolution gradients vs lax's own.

Commands (from the repository root):

  python experiments/conv_probe.py OUT.json             # docs/gpu-run-h200/conv_probe.json, NVIDIA H200
  python experiments/conv_probe.py OUT.json --augment   # README's cost of augmentation, CPU

With ``--augment`` it times the default recipe (augmented) against the same
recipe without augmentation, then augmented again, instead.

`adder.model.conv_valid` states both convolution gradients as plain forward
convolutions (a `jax.custom_vjp`), for XLA:CPU's sake. This times a steady
epoch (60,000 random images, batch 128, five epochs after the first) with it,
then with `lax.conv_general_dilated`'s own gradients swapped in, then with it
again, on whatever backend JAX picks; the first epoch, with compilation, is
reported apart.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adder import devices  # noqa: E402
from adder import model as model_lib  # noqa: E402
from adder import train  # noqa: E402
from adder.config import Config  # noqa: E402


def lax_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def time_epochs(dataset, epochs: int = 5, config: Config = Config().without_augmentation()) -> dict:
  s, state = train.setup(config, dataset)
  t0 = time.perf_counter()
  state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, 1)
  train.to_host(m["loss"])
  first = time.perf_counter() - t0
  times = []
  for epoch in range(2, epochs + 2):
    t0 = time.perf_counter()
    state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, epoch)
    train.to_host(m["loss"])
    times.append(time.perf_counter() - t0)
  return {"first_epoch_s": round(first, 3), "epoch_s": [round(t, 4) for t in times],
          "median_epoch_s": round(float(np.median(times)), 4)}


def main(out_path: str, augment: bool = False) -> None:
  rng = np.random.default_rng(0)
  dataset = {"train_images": rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8),
             "train_labels": rng.integers(0, 10, 60000).astype(np.int32),
             "test_images": rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8),
             "test_labels": rng.integers(0, 10, 10000).astype(np.int32)}
  custom = model_lib.conv_valid
  out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
  if augment:
    for name, config in (("augmented", Config()), ("plain", Config().without_augmentation()),
                         ("augmented_again", Config())):
      out[name] = time_epochs(dataset, 3, config)
      print(name, out[name], flush=True)
    with open(out_path, "w") as f:
      json.dump(out, f, indent=1)
    return
  for name, fn in (("custom_vjp", custom), ("lax_vjp", lax_conv), ("custom_vjp_again", custom)):
    model_lib.conv_valid = fn  # `Conv` looks it up at call time
    out[name] = time_epochs(dataset)
    print(name, out[name], flush=True)
  model_lib.conv_valid = custom
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  print(devices.configure_cpu_devices(Config().batch_size), flush=True)  # as adder.train
  main(sys.argv[1], augment="--augment" in sys.argv[2:])
