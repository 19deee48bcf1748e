"""The model's convolutions on the CPU as direct kernels of our own, through the XLA FFI.

XLA:CPU runs the model's 16-channel 3x3 convolutions on Eigen's general
kernel, which packs image patches before each product. `conv_cpu.cc`
computes them directly instead: each output pixel's 16 channels are one
vector register (AVX-512; two with AVX2), and each multiply-add broadcasts
one input value against a row of the kernel. It has two entry points, the
forward convolution and the kernel's gradient; the input's gradient is the
forward one on the padded output gradient with the flipped kernel
(`input_grad`).

The source is compiled on first use with the host's C++ compiler (``$CXX``,
else ``c++``), for the host's own CPU (``-march=native``), against the FFI
headers that come with jaxlib, and kept in ``$ADDER_CACHE_DIR`` (default
``$XDG_CACHE_HOME/adder``, else ``~/.cache/adder``) under a name that hashes
the source, the flags, jaxlib's version and the CPU, so a later process only
loads it.

The kernels are fenced like a dependency that may be missing or broken, and
`adder.model` keeps XLA's own convolutions wherever one fence stops them:
another OS or architecture; ``ADDER_CPU_KERNELS=0``, or `use_kernels` (False)
around the tracing; no compiler or a failed build; a compile still running
after `COMPILE_TIMEOUT_S`; or a self-check, once per process when the kernels
load, that finds them off XLA's ``lax.conv_general_dilated`` on a small random
case (`CHECK_CASE`; forward and both gradients, float32 tolerance).
`describe` says which convolutions run and why, for the start-up log; a build
or self-check failure is also logged once, on one line, as a warning.

The kernels compute the same sums as XLA's convolutions in another order:
the values agree to float32 rounding (tests/test_conv_cpu.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

SOURCE = Path(__file__).with_name("conv_cpu.cc")
ENV = "ADDER_CPU_KERNELS"  # "0": XLA's own convolutions
CACHE_ENV = "ADDER_CACHE_DIR"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
CHANNELS = 16  # channels in and out must be multiples of this (one vector of float32)
FORWARD, KERNEL_GRAD = "adder_conv_forward", "adder_conv_kernel_grad"
# The compile takes 3-5 s on a 2-core AMD EPYC; a compiler still running after
# this is stopped (with any process it started) and XLA's convolutions run.
COMPILE_TIMEOUT_S = 120.0
# The self-check's convolution, (N, H, W, Ci, Co, kh, kw): two vectors of output
# channels, a non-square image; a few milliseconds to run once compiled.
CHECK_CASE = (2, 8, 7, 16, 32, 3, 3)
# Largest difference from XLA the self-check accepts, as a fraction of XLA's
# largest |value|: float32 sums of 144 products in another order differ by
# ~1e-7 of it, a wrong kernel by ~1.
CHECK_TOLERANCE = 1e-5

_logger = logging.getLogger(__name__)
# The switch of `use_kernels`; JAX's jit caches key on its value, so a function
# traced with one setting is traced again under the other.
_SWITCH = jax.make_user_context(True)


class Kernels(NamedTuple):
  """The kernels' two entry points as JAX functions: what `_build` makes and `_self_check` checks.

  Attributes:
    forward: (x (N, H, W, Ci), kernel (kh, kw, Ci, Co)) -> (N, H - kh + 1, W - kw + 1, Co).
    kernel_grad: (x (N, H, W, Ci), g (N, Ho, Wo, Co), kh, kw) -> (kh, kw, Ci, Co).
  """
  forward: Callable[[jax.Array, jax.Array], jax.Array]
  kernel_grad: Callable[[jax.Array, jax.Array, int, int], jax.Array]


@contextlib.contextmanager
def use_kernels(on: bool) -> Iterator[None]:
  """Trace the model's convolutions in this block with adder's kernels (where they load) or not.

  On by default; ``ADDER_CPU_KERNELS=0`` turns them off for the whole process.
  The choice is made when a function is traced: JAX's jit caches key on it, so
  a function jitted outside the block and called inside is traced again, while
  a compiled executable (``.lower(...).compile()``) keeps its convolutions.
  Thread-local, and it nests.

  Example: ``with conv_cpu.use_kernels(False): state = epoch_fn(state, ...)``.
  """
  with _SWITCH(bool(on)):
    yield


def _host_supported() -> bool:
  """Whether the kernels are built for this OS and architecture (Linux x86-64)."""
  return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _cpu_id() -> str:
  """The host CPU's model and feature flags (what -march=native compiles for)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _library_path(compiler: str) -> Path:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(),
               jaxlib.__version__.encode(), _cpu_id().encode()):
    key.update(part)
  cache = Path(os.environ.get(CACHE_ENV)
               or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adder")
  return cache / f"conv_cpu-{key.hexdigest()[:16]}.so"


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _run_compiler(command: list[str]) -> None:
  """Run `command` in its own process group; stop the group after `COMPILE_TIMEOUT_S`.

  Raises:
    OSError: the compiler cannot be started. RuntimeError: it failed or ran too long.
  """
  proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    _, stderr = proc.communicate(timeout=COMPILE_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    if hasattr(os, "killpg"):  # the driver's own children (cc1plus, as) too
      os.killpg(proc.pid, signal.SIGKILL)
    else:
      proc.kill()
    proc.communicate()
    raise RuntimeError(f"{shlex.join(command)} took over {COMPILE_TIMEOUT_S:g} s and was "
                       "stopped") from None
  if proc.returncode:  # the end of the compiler's message, on one line for the log
    raise RuntimeError(f"{shlex.join(command)} failed: {_one_line(stderr)[-300:]}")


def _compile(compiler: str, path: Path) -> None:
  """Compile `SOURCE` into `path`, atomically (parallel processes may race)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    _run_compiler([*shlex.split(compiler), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE),
                   "-o", str(out)])
    os.replace(out, path)


@functools.cache
def _register(path: Path) -> None:
  """Load the compiled library at `path` and register its two entry points with XLA:CPU."""
  library = ctypes.cdll.LoadLibrary(str(path))
  for name, symbol in ((FORWARD, library.AdderConvForward),
                       (KERNEL_GRAD, library.AdderConvKernelGrad)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")


def _build() -> tuple[Kernels, str]:
  """Compile (unless cached) and register the kernels: them and the library's file name.

  Raises:
    OSError, RuntimeError, AttributeError: no compiler, a failed or too long
      compile, an unloadable library.
  """
  compiler = os.environ.get("CXX", "c++")
  path = _library_path(compiler)
  if not path.exists():
    _compile(compiler, path)
  _register(path)
  return Kernels(_ffi_forward, _ffi_kernel_grad), path.name


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _outputs(kernels: Kernels, x: jax.Array, kernel: jax.Array, g: jax.Array) -> dict:
  """{name: (the kernels' value, XLA's)} of the forward pass and both gradients."""
  kh, kw = kernel.shape[:2]
  want, pullback = jax.vjp(_xla_conv, x, kernel)
  want_dx, want_dk = pullback(g)
  return {"forward": (kernels.forward(x, kernel), want),
          "input gradient": (_input_grad_with(kernels.forward, g, kernel), want_dx),
          "kernel gradient": (kernels.kernel_grad(x, g, kh, kw), want_dk)}


def _self_check(kernels: Kernels) -> Optional[str]:
  """None if `kernels` match XLA's convolution on `CHECK_CASE`, else what differs, on one line.

  Forward, the input's gradient (`input_grad` through ``kernels.forward``) and
  the kernel's gradient, each within `CHECK_TOLERANCE` of XLA's largest value;
  one jitted call on the CPU (a few tenths of a second, mostly compiling it).
  It runs at once even when first asked for while a function is being traced,
  and leaves nothing in that trace.
  """
  n, h, w, ci, co, kh, kw = CHECK_CASE
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, ci), dtype=np.float32)
  kernel = rng.standard_normal((kh, kw, ci, co), dtype=np.float32)
  g = rng.standard_normal((n, h - kh + 1, w - kw + 1, co), dtype=np.float32)
  with jax.ensure_compile_time_eval():
    inputs = jax.device_put((x, kernel, g), jax.devices("cpu")[0])
    outputs = jax.device_get(jax.jit(functools.partial(_outputs, kernels))(*inputs))
  for name, (value, reference) in outputs.items():
    if value.shape != reference.shape:
      return f"its {name} has shape {value.shape}, XLA's {reference.shape}"
    scale = float(np.abs(reference).max())
    error = float(np.abs(value - reference).max())
    if not error <= CHECK_TOLERANCE * scale:  # NaN fails too
      return f"its {name} is off XLA's by up to {error:.3g} (XLA's largest |value|: {scale:.3g})"
  return None


@functools.cache
def _load() -> tuple[bool, str]:
  """(whether the kernels are registered and checked, a line saying which convolutions run and why).

  Once per process; a build or self-check failure is logged as a warning.
  """
  if os.environ.get(ENV, "1") == "0":
    return False, f"XLA's ({ENV}=0)"
  if not _host_supported():
    return False, "XLA's (adder's kernels are built for Linux x86-64 only)"
  try:
    kernels, name = _build()
  except Exception as e:  # pylint: disable=broad-except  # a fence: any failure falls back
    why = f"XLA's (adder's kernels unavailable: {_one_line(str(e))})"
    _logger.warning("cpu convolutions: %s", why)
    return False, why
  try:
    mismatch = _self_check(kernels)
  except Exception as e:  # pylint: disable=broad-except
    mismatch = f"it raised {type(e).__name__}: {_one_line(str(e))}"
  if mismatch:
    why = f"XLA's (adder's kernels failed their self-check: {mismatch})"
    _logger.warning("cpu convolutions: %s", why)
    return False, why
  return True, f"adder's direct kernels, built for this CPU ({name})"


def describe() -> str:
  """Which convolutions the model runs on the CPU, for the start-up log and ``results.json``."""
  if not _SWITCH.value:
    return "cpu convolutions: XLA's (switched off: adder.conv_cpu.use_kernels(False))"
  loaded, why = _load()
  if loaded and jax.device_count() > 1:
    why = f"XLA's (the batch is split over {jax.device_count()} devices)"
  return "cpu convolutions: " + why


def supports(kernel_shape: tuple[int, ...], dtype) -> bool:
  """Whether a convolution with this HWIO kernel shape and dtype runs on the kernels here.

  Float32, input and output channels multiples of 16 (a one-channel input is
  faster as XLA's product of shifted windows, `adder.model._conv_windows`),
  and JAX training on one CPU device: a convolution of a batch split over
  several devices stays XLA's, whose partitioner splits it with the batch
  (an FFI call it would gather whole), and a GPU host builds nothing. Also
  switched on (`use_kernels`), built, and through the self-check (`_load`).
  """
  return (jnp.dtype(dtype) == jnp.float32 and kernel_shape[-1] % CHANNELS == 0
          and kernel_shape[-2] % CHANNELS == 0 and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and _SWITCH.value and _load()[0])


def _require() -> None:
  loaded, why = _load()
  if not loaded:
    raise RuntimeError(f"adder's CPU kernels are not in use: {why}")


def _ffi_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, co), jnp.float32)
  return jax.ffi.ffi_call(FORWARD, out)(x, kernel)


def _ffi_kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(KERNEL_GRAD, out)(x, g)


def _input_grad_with(forward_fn: Callable[[jax.Array, jax.Array], jax.Array], g: jax.Array,
                     kernel: jax.Array) -> jax.Array:
  """`input_grad` through `forward_fn` (the kernels' own forward, or one under test)."""
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(g, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  return forward_fn(padded, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


def forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID stride-1 convolution: float32 x (N, H, W, Ci), kernel (kh, kw, Ci, Co) -> (N, Ho, Wo, Co).

  Co must be a multiple of 16; CPU only.
  """
  _require()
  return _ffi_forward(x, kernel)


def kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """dL/dkernel: x (N, H, W, Ci), g (N, Ho, Wo, Co) -> float32 (kh, kw, Ci, Co); Co % 16 == 0."""
  _require()
  return _ffi_kernel_grad(x, g, kh, kw)


def input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """dL/dx: g (N, Ho, Wo, Co), kernel (kh, kw, Ci, Co) -> (N, H, W, Ci); needs Ci % 16 == 0.

  The full correlation of g with the flipped kernel, in/out features swapped:
  `forward` on g padded by kh - 1 and kw - 1 on each side.
  """
  return _input_grad_with(forward, g, kernel)
