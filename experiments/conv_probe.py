"""Epoch time of `adder.step.train_epoch` with the model's convolution gradients vs lax's own.

Commands (from the repository root; the CPU figures are in docs/cpu-performance.md,
the cost of augmentation in docs/design.md):

  python experiments/conv_probe.py OUT.json                  # docs/gpu-run-h200/conv_probe.json, NVIDIA H200
  python experiments/conv_probe.py OUT.json --augment        # cost of augmentation, CPU
  python experiments/conv_probe.py OUT.json --cpu-forms      # CPU convolution forms
  python experiments/conv_probe.py OUT.json --cpu-devices 1,2  # CPU device counts
  python experiments/conv_probe.py OUT.json --cpu-pinned       # one core against two
  python experiments/conv_probe.py OUT.json --cpu-layers       # layers, adder/XLA/PyTorch
  python experiments/conv_probe.py OUT.json --cpu-ynn          # YNNPACK convolutions
  python experiments/conv_probe.py OUT.json --cpu-kernels      # adder kernels vs XLA's

With ``--augment`` it times the default recipe (augmented) against the same
recipe without augmentation, then augmented again, instead. With
``--cpu-forms`` it compiles five trainers in one process, the model as it is
and with one part in another form (the kernel gradient as one convolution
instead of chunks of the batch; the first layer as XLA's convolution instead
of one matrix product; max pooling's gradient left to JAX's autodiff of the
reduction; BatchNorm left out, its scale and shift kept: another model, an
upper bound on what its statistics cost), then times one epoch of each in
turn, four rounds. With
``--cpu-devices`` it runs one subprocess per CPU device count
(``JAX_NUM_CPU_DEVICES``; more than one runs each single-threaded,
``--xla_cpu_multi_thread_eigen=false``), in turn, twice. With ``--cpu-pinned``
it runs one single-threaded subprocess pinned to the first core, then two at
once, pinned to the first and the second, then the model as it is, unpinned.
All but ``--augment`` time the recipe without augmentation, as the benchmark
does. With ``--cpu-layers`` it times each convolution of the model alone, at
the training batch, in turn with PyTorch's on the same shapes (see
`cpu_layers`). With ``--cpu-ynn`` it times the default model and a wider
one with XLA:CPU's YNNPACK convolutions and without them (see `cpu_ynn`).
With ``--cpu-kernels`` it times the trainer's epoch with `adder.conv_cpu`'s
kernels against XLA's convolutions (see `cpu_kernels`).
``--cpu-forms`` and ``--cpu-ynn`` are about XLA's own convolutions, so they
trace the model without `adder.conv_cpu`'s kernels (`adder.conv_cpu.use_kernels`).

`adder.model.conv_valid` states both convolution gradients as plain forward
convolutions (a `jax.custom_vjp`), for XLA:CPU's sake. This times a steady
epoch (60,000 random images, batch 128, five epochs after the first) with it,
then with `lax.conv_general_dilated`'s own gradients swapped in, then with it
again, on whatever backend JAX picks; the first epoch, with compilation, is
reported apart.
"""

import functools
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adder import conv_cpu  # noqa: E402
from adder import devices  # noqa: E402
from adder import distributed  # noqa: E402
from adder import model as model_lib  # noqa: E402
from adder import step  # noqa: E402
from adder import train  # noqa: E402
from adder.config import Config  # noqa: E402


def lax_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def time_epochs(dataset, epochs: int = 5, config: Config = Config().without_augmentation()) -> dict:
  s, state = train.setup(config, dataset)
  t0 = time.perf_counter()
  state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, 1)
  distributed.to_host(m["loss"])
  first = time.perf_counter() - t0
  times = []
  for epoch in range(2, epochs + 2):
    t0 = time.perf_counter()
    state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, epoch)
    distributed.to_host(m["loss"])
    times.append(time.perf_counter() - t0)
  return {"first_epoch_s": round(first, 3), "epoch_s": [round(t, 4) for t in times],
          "median_epoch_s": round(float(np.median(times)), 4)}


def autodiff_max_pool(x):
  """`adder.model.max_pool_2x2` without its stated gradient: JAX's rule for a max."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _epoch(s, state, epoch: int):
  """One training epoch, to the host holding its losses: the new state and the seconds."""
  t0 = time.perf_counter()
  state, m = s.epoch_fn(state, s.train_x, s.train_y, s.data_key, epoch)
  distributed.to_host(m["loss"])
  return state, time.perf_counter() - t0


class ScaleShiftOnly(nn.Module):
  """`adder.model.BatchNorm`'s variables with its scale and shift but no normalisation.

  Another model: in `CPU_FORMS` it bounds what BatchNorm's statistics and
  their gradients cost a step.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    return x * scale + bias


# (form, name in adder.model, its replacement while tracing); None: the model as it is.
CPU_FORMS = (
    ("as_is", None, None),
    ("kernel_grad_whole", "_kernel_grad_chunked", model_lib._kernel_grad),
    ("first_layer_xla_conv", "_conv_windows", model_lib._conv),
    ("pool_autodiff", "max_pool_2x2", autodiff_max_pool),
    ("batchnorm_left_out", "BatchNorm", ScaleShiftOnly),
)


def cpu_forms(dataset, rounds: int = 4) -> dict:
  """Each of `CPU_FORMS` compiled (its first epoch), then one epoch of each in turn, `rounds` times.

  Functions of `adder.model` are looked up while tracing, so a form's trainer
  keeps its replacement after the original is put back.
  """
  config = Config().without_augmentation()
  runs = {}
  for form, name, replacement in CPU_FORMS:
    original = getattr(model_lib, name) if name else None
    if name:
      setattr(model_lib, name, replacement)
    try:
      s, state = train.setup(config, dataset)
      state, first = _epoch(s, state, 1)
    finally:
      if name:
        setattr(model_lib, name, original)
    runs[form] = (s, state, first)
  return _alternate(runs, rounds)


def _alternate(runs: dict, rounds: int) -> dict:
  """One epoch of each run in turn, `rounds` times: each run's epoch times and their median.

  Args:
    runs: ``{name: (setup, state, first_epoch_seconds)}``, each compiled and
      past its first epoch.
  """
  states = {name: state for name, (_, state, _) in runs.items()}
  times = {name: [] for name in runs}
  for round_ in range(rounds):
    for name, (s, _, _) in runs.items():
      states[name], seconds = _epoch(s, states[name], round_ + 2)
      times[name].append(seconds)
    print("round", round_ + 1, {name: round(t[-1], 2) for name, t in times.items()}, flush=True)
  return {name: {"first_epoch_s": round(runs[name][2], 3),
                 "epoch_s": [round(t, 4) for t in times[name]],
                 "median_epoch_s": round(float(np.median(times[name])), 4)} for name in runs}


def cpu_kernels(dataset, rounds: int = 4) -> dict:
  """The trainer's epoch with `adder.conv_cpu`'s kernels and with XLA's convolutions, in turn.

  One process: each is compiled ahead of time (its first epoch is timed
  apart), then one epoch of each runs in turn, `rounds` times.
  """
  config = Config().without_augmentation()
  runs = {}
  for form, kernels in (("adder_kernels", True), ("xla_convolutions", False)):
    with conv_cpu.use_kernels(kernels):
      s, state = train.setup(config, dataset)
      compiled = s.epoch_fn.lower(state, s.train_x, s.train_y, s.data_key, 1).compile()
      s = s._replace(epoch_fn=compiled)
      state, first = _epoch(s, state, 1)
    runs[form] = (s, state, first)
  return {"convolutions": conv_cpu.describe(), **_alternate(runs, rounds)}


def _median_ms(fn, calls: int = 20, rounds: int = 7) -> float:
  """Median over `rounds` of the mean milliseconds of `calls` calls of `fn` (after one warm-up)."""
  fn()
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    times.append((time.perf_counter() - t0) / calls)
  return round(float(np.median(times)) * 1e3, 3)


def conv_layer_shapes(config: Config) -> list[tuple[int, int, int]]:
  """(input side, input channels, output channels) of each convolution of `config`'s model.

  Read from the model itself: its `adder.model.Conv` calls, recorded while
  ``jax.eval_shape`` traces an initialisation (nothing is computed).
  """
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, model_lib.Conv) and context.method_name == "__call__":
      shapes.append((args[0].shape[1], args[0].shape[-1], context.module.features))
    return next_fun(*args, **kwargs)

  model = model_lib.create_model(config)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.PRNGKey(0)))
  return shapes


def cpu_layers(batch: int, config: Config = Config()) -> dict:
  """Each convolution of the model at `batch`: its time in JAX and in PyTorch, in turn, one process.

  JAX: `adder.model.conv_valid` jitted alone (forward), and its output with
  the gradients training needs (the kernel's, and the input's except for the
  first layer, whose input is the image) from one jit of ``jax.vjp``; as the
  model runs it ("adder": `adder.conv_cpu`'s kernels where they apply) and
  with XLA's convolutions (`adder.conv_cpu.use_kernels`). PyTorch: ``nn.Conv2d``
  (bias-free, as the reference) forward, and forward + ``backward``, in NCHW
  and in channels-last memory, with as many threads as usable cores.
  Milliseconds per call, the median of seven rounds; printed as a table
  (`layers_table`) at the end. A lone jitted op is not what a training step
  pays for it: inside the epoch XLA fuses and overlaps.
  """
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(devices.usable_cores())
  out = {"batch": batch, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "convolutions": conv_cpu.describe()}
  rng = np.random.default_rng(0)
  for side, ci, co in conv_layer_shapes(config):
    x = rng.standard_normal((batch, side, side, ci), dtype=np.float32)
    k = rng.standard_normal((3, 3, ci, co), dtype=np.float32) * 0.1
    g = rng.standard_normal((batch, side - 2, side - 2, co), dtype=np.float32)

    def forward_and_grads(x, k, g, first=ci == 1):
      y, pullback = jax.vjp(model_lib.conv_valid, x, k)
      dx, dk = pullback(g)
      return (y, dk) if first else (y, dx, dk)

    xj, kj, gj = jnp.asarray(x), jnp.asarray(k), jnp.asarray(g)
    row = {}
    for name in ("adder", "xla"):
      with conv_cpu.use_kernels(name == "adder"):
        fwd, both = jax.jit(model_lib.conv_valid), jax.jit(forward_and_grads)
        row[f"{name}_forward_ms"] = _median_ms(lambda: fwd(xj, kj).block_until_ready())
        row[f"{name}_forward_and_grads_ms"] = _median_ms(
            lambda: jax.block_until_ready(both(xj, kj, gj)))
    for layout, memory in (("nchw", torch.contiguous_format),
                           ("channels_last", torch.channels_last)):
      conv = torch.nn.Conv2d(ci, co, 3, bias=False).to(memory_format=memory)
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=memory)
      xt.requires_grad_(ci > 1)
      gt = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=memory)

      def forward_backward(conv=conv, xt=xt, gt=gt):
        conv(xt).backward(gt)

      with torch.no_grad():
        row[f"torch_{layout}_forward_ms"] = _median_ms(lambda conv=conv, xt=xt: conv(xt))
      row[f"torch_{layout}_forward_and_grads_ms"] = _median_ms(forward_backward)
    out[f"{side}x{side}x{ci}->{co}"] = row
    print(f"{side}x{side}x{ci}->{co}", row, flush=True)
  print(layers_table(out), flush=True)
  return out


# `cpu_layers`' figures for each layer, in `layers_table`'s column order, with
# their headings.
LAYER_COLUMNS = {
    "adder_forward_ms": "adder forward", "xla_forward_ms": "XLA forward",
    "torch_nchw_forward_ms": "PyTorch forward, NCHW",
    "torch_channels_last_forward_ms": "PyTorch forward, channels-last",
    "adder_forward_and_grads_ms": "adder forward + grads",
    "xla_forward_and_grads_ms": "XLA forward + grads",
    "torch_nchw_forward_and_grads_ms": "PyTorch forward + grads, NCHW",
    "torch_channels_last_forward_and_grads_ms": "PyTorch forward + grads, channels-last",
}


def layers_table(result: dict) -> str:
  """`cpu_layers`' figures as a markdown table, a row per layer and a row of totals."""
  columns = list(LAYER_COLUMNS)
  lines = ["| layer (input, channels) | " + " | ".join(LAYER_COLUMNS.values()) + " |",
           "|---" + "|---:" * len(columns) + "|"]
  rows = {k: v for k, v in result.items() if "->" in k}
  for name, row in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
  totals = [sum(row[c] for row in rows.values()) for c in columns]
  lines.append("| all layers | " + " | ".join(f"{t:.2f}" for t in totals) + " |")
  return "\n".join(lines)


# XLA:CPU hands these kinds of op to its YNNPACK library kernels. XLA's own
# default (jaxlib 0.10) is these and individual convolutions, those with more
# than 16 input or output features; the default's count of YNNPACK fusions less
# those of its convolutions, which `cpu_ynn` records, confirms it.
YNN_WITHOUT_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

# (name, model) of `cpu_ynn`: the default, and every convolution after the
# first at 20 features (docs/recipe-search.md's width screen), whose convolutions all
# have more than 16 features.
YNN_MODELS = (("default", Config()),
              ("conv_16x20x20x20x20_hidden_40",
               Config(conv_features=(16, 20, 20, 20, 20), hidden_features=40)))


def _ynn_fusions(compiled) -> int:
  """How many YNNPACK fusions a compiled program holds."""
  return sum(1 for line in compiled.as_text().splitlines()
             if re.match(r"\s*(ROOT )?%ynn_fusion\S* = ", line))


def cpu_ynn(dataset, rounds: int = 3) -> dict:
  """Each of `YNN_MODELS`' epochs with XLA's defaults and with `YNN_WITHOUT_CONVOLUTIONS`.

  One process: the epoch (without augmentation) is compiled once per model
  and compiler options (its first epoch), then one epoch of each runs in turn,
  `rounds` times. The options apply to that one jit (``compiler_options``);
  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
  sets the same for a whole process.
  """
  runs, fusions = {}, {}
  for name, config in YNN_MODELS:
    config = config.without_augmentation()
    s, state = train.setup(config, dataset)
    for options_name, options in (("xla_default", None),
                                  ("without_ynn_convolutions", YNN_WITHOUT_CONVOLUTIONS)):
      fn = jax.jit(functools.partial(step.train_epoch, batch_size=config.batch_size,
                                     batch_sharding=s.batch_sharding, augment=None),
                   donate_argnums=0, compiler_options=options)
      own = jax.tree_util.tree_map(jnp.copy, state)
      compiled = fn.lower(own, s.train_x, s.train_y, s.data_key, 1).compile()
      run = s._replace(epoch_fn=compiled)
      own, first = _epoch(run, own, 1)
      runs[f"{name}/{options_name}"] = (run, own, first)
      fusions[f"{name}/{options_name}"] = _ynn_fusions(compiled)
  timed = _alternate(runs, rounds)
  return {"options": YNN_WITHOUT_CONVOLUTIONS,
          **{k: {"ynn_fusions": fusions[k], **figures} for k, figures in timed.items()}}


def _env_without_cpu_choices() -> dict:
  """This process's environment less the CPU device count and XLA flags."""
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}


def _child(out_path: str, tag: str, env: dict, core: Optional[int]) -> subprocess.Popen:
  """A subprocess timing the model as it is (``--as-is``), pinned to ``core`` if given."""
  pin = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), f"{out_path}.{tag}.json",
                           "--as-is"], env=env, preexec_fn=pin)


def _collect(out_path: str, children: dict) -> dict:
  """Wait for `_child` processes ``{tag: process}``; their figures ``{tag: as_is}``."""
  out = {}
  for tag, child in children.items():
    if child.wait() != 0:
      raise SystemExit(f"error: the {tag} probe failed (exit {child.returncode})")
    with open(f"{out_path}.{tag}.json") as f:
      out[tag] = json.load(f)["as_is"]
    os.remove(f"{out_path}.{tag}.json")
    print(tag, out[tag], flush=True)
  return out


def cpu_devices(counts: list[int], out_path: str) -> dict:
  """One subprocess per device count, in turn, twice; each times the model as it is."""
  out = {}
  for round_ in (1, 2):
    for n in counts:
      env = {**_env_without_cpu_choices(), "JAX_NUM_CPU_DEVICES": str(n)}
      if n > 1:  # each device single-threaded on its own core, as adder once chose
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
      tag = f"{n}_devices_round_{round_}"
      out.update(_collect(out_path, {tag: _child(out_path, tag, env, None)}))
  return out


def cpu_pinned(out_path: str) -> dict:
  """One single-threaded process on core 0; then two at once on cores 0 and 1; then unpinned."""
  env = _env_without_cpu_choices()
  single = {**env, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", "JAX_NUM_CPU_DEVICES": "1"}
  out = _collect(out_path, {"core0_alone": _child(out_path, "core0_alone", single, 0)})
  out.update(_collect(out_path, {f"core{c}_of_two": _child(out_path, f"core{c}_of_two", single, c)
                                 for c in (0, 1)}))
  out.update(_collect(out_path, {"unpinned_default":
                                 _child(out_path, "unpinned_default", env, None)}))
  return out


def main(out_path: str, augment: bool = False, forms: bool = False,
         devices_: Optional[list[int]] = None, as_is: bool = False,
         pinned: bool = False, layers: bool = False, ynn: bool = False,
         kernels: bool = False) -> None:
  """Run the probe the flags choose and write its figures to `out_path` (JSON)."""
  if layers:
    out = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
           **cpu_layers(Config().batch_size)}
  elif pinned:
    out = {"jax": jax.__version__, "cores": sorted(os.sched_getaffinity(0)),
           **cpu_pinned(out_path)}
  elif devices_:
    out = {"jax": jax.__version__, **cpu_devices(devices_, out_path)}
  else:
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "cpu_devices": len(jax.local_devices(backend="cpu"))}
    out.update(_epochs_here(_random_dataset(), augment=augment, forms=forms, as_is=as_is,
                            ynn=ynn, kernels=kernels))
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)


def _random_dataset() -> dict:
  """Random images and labels shaped like MNIST's (60,000 train / 10,000 test)."""
  rng = np.random.default_rng(0)
  return {"train_images": rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8),
          "train_labels": rng.integers(0, 10, 60000).astype(np.int32),
          "test_images": rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8),
          "test_labels": rng.integers(0, 10, 10000).astype(np.int32)}


def _epochs_here(dataset, augment: bool, forms: bool, as_is: bool, ynn: bool,
                 kernels: bool) -> dict:
  """The figures of the probes that time epochs in this process (the first flag set)."""
  if kernels:
    return cpu_kernels(dataset)
  if ynn:
    with conv_cpu.use_kernels(False):  # a question about XLA's own convolutions
      return cpu_ynn(dataset)
  if forms:
    with conv_cpu.use_kernels(False):  # the forms are those of XLA's convolutions
      return cpu_forms(dataset)
  if as_is:
    return {"as_is": time_epochs(dataset, 3)}
  out = {}
  if augment:
    for name, config in (("augmented", Config()), ("plain", Config().without_augmentation()),
                         ("augmented_again", Config())):
      out[name] = time_epochs(dataset, 3, config)
      print(name, out[name], flush=True)
    return out
  custom = model_lib.conv_valid
  for name, fn in (("custom_vjp", custom), ("lax_vjp", lax_conv), ("custom_vjp_again", custom)):
    model_lib.conv_valid = fn  # `Conv` looks it up at call time
    out[name] = time_epochs(dataset)
    print(name, out[name], flush=True)
  model_lib.conv_valid = custom
  return out


if __name__ == "__main__":
  args = sys.argv[2:]
  counts = ([int(n) for n in args[args.index("--cpu-devices") + 1].split(",")]
            if "--cpu-devices" in args else None)
  pinned = "--cpu-pinned" in args
  if counts is None and not pinned:  # those parents start no backend of their own
    print(devices.configure_cpu_devices(Config().batch_size), flush=True)  # as adder.train
  main(sys.argv[1], augment="--augment" in args, forms="--cpu-forms" in args,
       devices_=counts, as_is="--as-is" in args, pinned=pinned, layers="--cpu-layers" in args,
       ynn="--cpu-ynn" in args, kernels="--cpu-kernels" in args)
