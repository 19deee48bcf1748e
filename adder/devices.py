"""Which devices train: the CPU's per-core devices, and the one-axis ``data`` mesh.

On an accelerator JAX's defaults are right. On the CPU they are not: JAX gives
the whole machine one device, and XLA:CPU parallelises a small convolution
poorly across cores. One XLA host device per core, with the batch split over
them along the ``data`` mesh axis, trains about twice as fast on two cores
(see BENCHMARKS.md); each device then runs its part single-threaded
(``--xla_cpu_multi_thread_eigen=false``), as its core is its own.

`configure_cpu_devices` makes that choice. It must run before JAX starts its
backend (the first call that touches a device), so the entry points call it
first thing. It never overrides what the user set: ``JAX_PLATFORMS`` naming
another platform, ``JAX_NUM_CPU_DEVICES``, or a device count or the Eigen
flag already in ``XLA_FLAGS`` leave the corresponding choice alone. Where JAX
will train on a GPU (a CUDA plugin and an NVIDIA device are present, and
``JAX_PLATFORMS`` is unset), nothing is changed.

In a run of several processes (`adder.train.initialize_distributed`), each
process chooses its devices for its share of the global batch, and the
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
EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"
COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"  # the user's choice, if set
# Fewer images than this per device and the per-step synchronisation costs
# more than the split saves.
MIN_PER_DEVICE_BATCH = 16


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def cpu_device_count(batch_size: int, cores: int) -> int:
  """Host devices for a global batch: the most, up to one per core, that divide it.

  Each device keeps at least `MIN_PER_DEVICE_BATCH` images, so a small batch on
  a large machine does not drown in synchronisation.
  """
  limit = max(1, min(cores, batch_size // MIN_PER_DEVICE_BATCH))
  return max(n for n in range(1, limit + 1) if batch_size % n == 0)


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
  """Give the CPU backend one device per core for `batch_size`; say what was chosen.

  Call before JAX's backend starts. Sets ``jax_num_cpu_devices`` and appends
  ``--xla_cpu_multi_thread_eigen=false`` to ``XLA_FLAGS`` (when it splits
  the work over more than one device), unless the user decided either.

  Args:
    batch_size: the global batch.
    env: the environment to read (and extend); None: ``os.environ``.
    processes: the processes of the run. Each process's devices share
      ``batch_size // processes`` images; with more than one, the CPU's
      cross-process collectives (``jax_cpu_collectives_implementation``) are
      set to Gloo unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` is set.

  Returns:
    One line for the start-up log, e.g. ``"cpu: 2 device(s) for 2 core(s),
    batch 128 split 2 ways, --xla_cpu_multi_thread_eigen=false"`` or ``"cpu:
    device count as set by the user (XLA_FLAGS)"``.
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
  xla_flags = env.get("XLA_FLAGS", "")
  if "JAX_NUM_CPU_DEVICES" in env or DEVICE_COUNT_FLAG in xla_flags:
    source = "JAX_NUM_CPU_DEVICES" if "JAX_NUM_CPU_DEVICES" in env else "XLA_FLAGS"
    return f"cpu: device count as set by the user ({source})" + across
  cores = usable_cores()
  share = batch_size // processes  # this process's part of every batch
  n = cpu_device_count(share, cores)
  jax.config.update("jax_num_cpu_devices", n)
  per_process = " per process" if processes > 1 else ""
  line = f"cpu: {n} device(s) for {cores} core(s), batch {share}{per_process} split {n} ways"
  if n > 1 and EIGEN_FLAG not in xla_flags:
    env["XLA_FLAGS"] = f"{xla_flags} {EIGEN_FLAG}=false".strip()
    line += f", {EIGEN_FLAG}=false"
  return line + across


def create_mesh() -> Mesh:
  """A 1-D mesh with axis ``data`` over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def describe() -> str:
  """The backend and its devices, for the start-up log."""
  return (f"JAX {jax.__version__} backend={jax.default_backend()} "
          f"devices={[str(d) for d in jax.devices()]}")
