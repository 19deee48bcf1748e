"""Epoch time of `adder.train.train_epoch` with the model's convolution gradients vs lax's own.

Commands (from the repository root):

  python experiments/conv_probe.py OUT.json                  # docs/gpu-run-h200/conv_probe.json, NVIDIA H200
  python experiments/conv_probe.py OUT.json --augment        # README's cost of augmentation, CPU
  python experiments/conv_probe.py OUT.json --cpu-forms      # README's CPU convolution forms
  python experiments/conv_probe.py OUT.json --cpu-devices 1,2  # README's CPU device counts

With ``--augment`` it times the default recipe (augmented) against the same
recipe without augmentation, then augmented again, instead. With
``--cpu-forms`` it times the model as it is, then with the kernel gradient as
one convolution instead of chunks of the batch, then with the first layer as
XLA's convolution instead of one matrix product, then with max pooling's
gradient left to JAX's autodiff of the reduction, then as it is again. With
``--cpu-devices`` it runs one subprocess per CPU device count
(``JAX_NUM_CPU_DEVICES``; more than one runs each single-threaded,
``--xla_cpu_multi_thread_eigen=false``), in turn, twice. All but ``--augment`` time the
recipe without augmentation, as the benchmark does.

`adder.model.conv_valid` states both convolution gradients as plain forward
convolutions (a `jax.custom_vjp`), for XLA:CPU's sake. This times a steady
epoch (60,000 random images, batch 128, five epochs after the first) with it,
then with `lax.conv_general_dilated`'s own gradients swapped in, then with it
again, on whatever backend JAX picks; the first epoch, with compilation, is
reported apart.
"""

import json
import os
import subprocess
import sys
import time
from typing import Optional

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


def autodiff_max_pool(x):
  """`adder.model.max_pool_2x2` without its stated gradient: JAX's rule for a max."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _swapped(name: str, replacement):
  """Run `time_epochs` with ``adder.model.<name>`` replaced (looked up at trace time)."""
  def run(dataset):
    original = getattr(model_lib, name)
    setattr(model_lib, name, replacement)
    try:
      return time_epochs(dataset, 3)
    finally:
      setattr(model_lib, name, original)
  return run


CPU_FORMS = (
    ("as_is", lambda dataset: time_epochs(dataset, 3)),
    ("kernel_grad_whole", _swapped("_kernel_grad_chunked", model_lib._kernel_grad)),
    ("first_layer_xla_conv", _swapped("_conv_windows", model_lib._conv)),
    ("pool_autodiff", _swapped("max_pool_2x2", autodiff_max_pool)),
    ("as_is_again", lambda dataset: time_epochs(dataset, 3)),
)


def cpu_devices(counts: list[int], out_path: str) -> dict:
  """One subprocess per device count, in turn, twice; each times the model as it is."""
  out = {}
  for round_ in (1, 2):
    for n in counts:
      env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
      env["JAX_NUM_CPU_DEVICES"] = str(n)
      if n > 1:  # each device single-threaded on its own core, as adder once chose
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
      child = f"{out_path}.{n}dev.{round_}.json"
      subprocess.run([sys.executable, os.path.abspath(__file__), child, "--as-is"], env=env,
                     check=True)
      with open(child) as f:
        out[f"{n}_devices_round_{round_}"] = json.load(f)["as_is"]
      os.remove(child)
      print(n, "device(s):", out[f"{n}_devices_round_{round_}"], flush=True)
  return out


def main(out_path: str, augment: bool = False, forms: bool = False,
         devices_: Optional[list[int]] = None, as_is: bool = False) -> None:
  if devices_:
    with open(out_path, "w") as f:
      json.dump({"jax": jax.__version__, **cpu_devices(devices_, out_path)}, f, indent=1)
    return
  out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
         "cpu_devices": len(jax.local_devices(backend="cpu"))}
  rng = np.random.default_rng(0)
  dataset = {"train_images": rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8),
             "train_labels": rng.integers(0, 10, 60000).astype(np.int32),
             "test_images": rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8),
             "test_labels": rng.integers(0, 10, 10000).astype(np.int32)}
  custom = model_lib.conv_valid
  if forms or as_is:
    for name, run in CPU_FORMS[:1] if as_is else CPU_FORMS:
      out[name] = run(dataset)
      print(name, out[name], flush=True)
    with open(out_path, "w") as f:
      json.dump(out, f, indent=1)
    return
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
  args = sys.argv[2:]
  counts = ([int(n) for n in args[args.index("--cpu-devices") + 1].split(",")]
            if "--cpu-devices" in args else None)
  if counts is None:  # the parent of --cpu-devices starts no backend of its own
    print(devices.configure_cpu_devices(Config().batch_size), flush=True)  # as adder.train
  main(sys.argv[1], augment="--augment" in args, forms="--cpu-forms" in args,
       devices_=counts, as_is="--as-is" in args)
