"""Which devices train: the CPU's device choice, and the one-axis ``data`` mesh.

On the CPU `adder` keeps JAX's default: one host device for the whole
machine, whose intra-op threads use every core. Splitting the batch over one
single-threaded host device per core (the ``data`` mesh over N CPU devices)
was measured 1.5x slower on the 2-core machine of BENCHMARKS.md; the split
only paid while the kernel gradient ran through YNNPACK, whose cost grew
faster than the batch (`adder.model.conv_valid` now avoids that path). A user
who wants per-core devices sets ``JAX_NUM_CPU_DEVICES``; the mesh and the step
are the same.

`configure_cpu_devices` says what the CPU will use and sets up several
processes' collectives. It must run before JAX starts its backend (the first
call that touches a device), so the entry points call it first thing. It
never overrides what the user set: ``JAX_PLATFORMS`` naming another platform,
``JAX_NUM_CPU_DEVICES``, or a device count in ``XLA_FLAGS``. Where JAX will
train on a GPU (a CUDA plugin and an NVIDIA device are present, and
``JAX_PLATFORMS`` is unset), nothing is changed.

In a run of several processes (`adder.distributed.initialize_distributed`), each
process trains its share of the global batch on its own devices, and the
processes exchange gradients through Gloo, JAX's TCP implementation of the
CPU's cross-process collectives (MPI would need an MPI library), unless
``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` says otherwise.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"  # the user's choice, if set


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def gpu_likely() -> bool:
  """Whether JAX will pick a GPU: a CUDA plugin is installed and an NVIDIA device exists.

  Answered without starting JAX's backend (which would fix the CPU device
  count); JAX itself decides in the end.
  """
  plugin = any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  return plugin and bool(glob.glob("/dev/nvidia[0-9]*"))


def configure_cpu_devices(
    batch_size: int, env: Optional[dict] = None, processes: int = 1
) -> str:
  """Say which CPU devices will train `batch_size`, and set up several processes.

  Call before JAX's backend starts. The device count stays JAX's default (one
  device per process) unless the user set one.

  Args:
    batch_size: the global batch.
    env: the environment to read; None: ``os.environ``. Nothing is written to it.
    processes: the processes of the run, each training ``batch_size //
      processes`` images of every batch. With more than one, the CPU's
      cross-process collectives (``jax_cpu_collectives_implementation``) are
      set to Gloo unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` is set.

  Returns:
    One line for the start-up log, e.g. ``"cpu: 1 device (JAX's default) over
    2 core(s), batch 128"`` or ``"cpu: device count as set by the user
    (XLA_FLAGS)"``.
  """
  env = os.environ if env is None else env
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms.split(","):
    return f"cpu: not used (JAX_PLATFORMS={platforms})"
  if not platforms and gpu_likely():
    return "cpu: left at JAX's defaults (a GPU is present)"
  across = ""
  if processes > 1:
    if COLLECTIVES_ENV in env:
      across = f"; collectives across {processes} processes as set by the user"
    else:
      # Without cross-process collectives a CPU backend cannot run a step
      # whose devices live in several processes.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      across = f"; Gloo collectives across {processes} processes"
  if "JAX_NUM_CPU_DEVICES" in env or DEVICE_COUNT_FLAG in env.get("XLA_FLAGS", ""):
    source = "JAX_NUM_CPU_DEVICES" if "JAX_NUM_CPU_DEVICES" in env else "XLA_FLAGS"
    return f"cpu: device count as set by the user ({source})" + across
  per_process = " per process" if processes > 1 else ""
  return (f"cpu: 1 device (JAX's default) over {usable_cores()} core(s), "
          f"batch {batch_size // processes}{per_process}" + across)


def create_mesh() -> Mesh:
  """A 1-D mesh with axis ``data`` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def describe() -> str:
  """The backend and its devices, for the start-up log."""
  return (f"JAX {jax.__version__} backend={jax.default_backend()} "
          f"devices={[str(d) for d in jax.devices()]}")
