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
loads it. Where that fails (no
compiler, another OS), or with ``ADDER_CPU_KERNELS=0``, `adder.model` keeps
XLA's own convolutions; `describe` says which, for the start-up log.

The kernels compute the same sums as XLA's convolutions in another order:
the values agree to float32 rounding (tests/test_conv_cpu.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("conv_cpu.cc")
ENV = "ADDER_CPU_KERNELS"  # "0": XLA's own convolutions
CACHE_ENV = "ADDER_CACHE_DIR"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
CHANNELS = 16  # channels in and out must be multiples of this (one vector of float32)
FORWARD, KERNEL_GRAD = "adder_conv_forward", "adder_conv_kernel_grad"


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


def _compile(compiler: str, path: Path) -> None:
  """Compile `SOURCE` into `path`, atomically (parallel processes may race)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    command = [*shlex.split(compiler), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE),
               "-o", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      message = " ".join(result.stderr.split())[-300:]  # one line for the start-up log
      raise RuntimeError(f"{shlex.join(command)} failed: {message}")
    os.replace(out, path)


@functools.cache
def _load() -> tuple[bool, str]:
  """(whether the kernels are registered, a line saying which convolutions run and why)."""
  if os.environ.get(ENV, "1") == "0":
    return False, f"XLA's ({ENV}=0)"
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    return False, "XLA's (adder's kernels are built for Linux x86-64 only)"
  compiler = os.environ.get("CXX", "c++")
  try:
    path = _library_path(compiler)
    if not path.exists():
      _compile(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in ((FORWARD, library.AdderConvForward),
                         (KERNEL_GRAD, library.AdderConvKernelGrad)):
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    return False, f"XLA's (adder's kernels unavailable: {e})"
  return True, f"adder's direct kernels, built for this CPU ({path.name})"


def describe() -> str:
  """Which convolutions the model runs on the CPU, for the start-up log and ``results.json``."""
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
  (an FFI call it would gather whole), and a GPU host builds nothing.
  """
  return (jnp.dtype(dtype) == jnp.float32 and kernel_shape[-1] % CHANNELS == 0
          and kernel_shape[-2] % CHANNELS == 0 and jax.default_backend() == "cpu"
          and jax.device_count() == 1 and _load()[0])


def _require() -> None:
  loaded, why = _load()
  if not loaded:
    raise RuntimeError(f"adder's CPU kernels are not in use: {why}")


def forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID stride-1 convolution: float32 x (N, H, W, Ci), kernel (kh, kw, Ci, Co) -> (N, Ho, Wo, Co).

  Co must be a multiple of 16; CPU only.
  """
  _require()
  n, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, co), jnp.float32)
  return jax.ffi.ffi_call(FORWARD, out)(x, kernel)


def kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
  """dL/dkernel: x (N, H, W, Ci), g (N, Ho, Wo, Co) -> float32 (kh, kw, Ci, Co); Co % 16 == 0."""
  _require()
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(KERNEL_GRAD, out)(x, g)


def input_grad(g: jax.Array, kernel: jax.Array) -> jax.Array:
  """dL/dx: g (N, Ho, Wo, Co), kernel (kh, kw, Ci, Co) -> (N, H, W, Ci); needs Ci % 16 == 0.

  The full correlation of g with the flipped kernel, in/out features swapped:
  `forward` on g padded by kh - 1 and kw - 1 on each side.
  """
  kh, kw = kernel.shape[:2]
  padded = jnp.pad(g, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
  return forward(padded, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
