"""Conversion between `adder.model.AdderNet` variables and a PyTorch state_dict.

The PyTorch side is ``TorchAdderNet`` in ``experiments/torch_reference.py``,
whose submodules carry the Flax module names, so the mapping is one to one:

===============================  ============================================
PyTorch state_dict key           Flax variable
===============================  ============================================
``conv{i}.weight`` (O, I, H, W)  ``params/conv{i}/kernel`` (H, W, I, O)
``bn{i}.weight``                 ``params/bn{i}/scale``
``bn{i}.bias``                   ``params/bn{i}/bias``
``bn{i}.running_mean``           ``batch_stats/bn{i}/mean``
``bn{i}.running_var``            ``batch_stats/bn{i}/var`` (both unbiased)
``bn{i}.num_batches_tracked``    none (dropped; written back as a given count)
``{name}.weight`` (out, in)      ``params/{name}/kernel`` (in, out)
``{name}.bias``                  ``params/{name}/bias``
===============================  ============================================

where ``{i}`` is 0..4 and ``{name}`` one of the Linear layers ``fc0``, ``fc1``,
``digit_head``, ``sum_head``.

BatchNorm conventions: `adder.model.BatchNorm` stores the unbiased running
variance, as ``nn.BatchNorm2d`` does, so running statistics copy unchanged.
Momentum and epsilon are module settings, not state: PyTorch's
``momentum=0.1`` is Flax's ``0.9`` (`torch_bn_momentum` converts), and both
sides use ``eps=1e-5`` (``Config.bn_epsilon``).

Everything works on numpy arrays (float32 unless asked). Torch tensors are
accepted as input (through their ``.detach().cpu().numpy()``), but torch is
never imported here: the library does not depend on it. Conversions are
exact: only transposes and copies, no arithmetic.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
from numpy.typing import DTypeLike

# Layouts: PyTorch conv weight (O, I, H, W) <-> Flax kernel (H, W, I, O).
_OIHW_TO_HWIO = (2, 3, 1, 0)
_HWIO_TO_OIHW = (3, 2, 0, 1)


def torch_bn_momentum(flax_momentum: float) -> float:
  """PyTorch ``BatchNorm`` momentum for a Flax one: ``0.9 -> 0.1``.

  PyTorch: ``running = (1 - m) * running + m * batch``; Flax: ``running = m *
  running + (1 - m) * batch``. The map is its own inverse.
  """
  return round(1.0 - flax_momentum, 12)  # 0.1, not 0.09999999999999998


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def _copy(x: np.ndarray, dtype: DTypeLike) -> np.ndarray:
  return np.array(x, dtype=dtype, order="C")  # a copy: never a read-only view


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any], dtype: DTypeLike = np.float32
) -> dict[str, dict]:
  """A ``TorchAdderNet`` state_dict -> ``{"params": ..., "batch_stats": ...}``.

  Args:
    state_dict: ``{"conv0.weight": ..., "bn0.running_var": ...}``; values are
      torch tensors or arrays. A dict of parameters only (no running
      statistics, e.g. gradients by parameter name) converts too, giving an
      empty ``batch_stats``.
    dtype: of the returned arrays (float64 keeps a float64 model exact).

  Returns:
    Nested dicts of numpy arrays in `adder.model.AdderNet`'s layout.

  Raises:
    ValueError: a key or a weight rank this mapping does not know.
  """
  params: dict[str, dict[str, np.ndarray]] = {}
  batch_stats: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state_dict.items():
    module, _, field = key.rpartition(".")
    if not module:
      raise ValueError(f"unexpected state_dict key {key!r}")
    x = _to_numpy(value)
    if field == "weight":
      if x.ndim == 4:  # Conv2d
        params.setdefault(module, {})["kernel"] = _copy(x.transpose(_OIHW_TO_HWIO), dtype)
      elif x.ndim == 2:  # Linear
        params.setdefault(module, {})["kernel"] = _copy(x.T, dtype)
      elif x.ndim == 1:  # BatchNorm2d
        params.setdefault(module, {})["scale"] = _copy(x, dtype)
      else:
        raise ValueError(f"{key}: weight of rank {x.ndim} has no Flax counterpart")
    elif field == "bias":
      params.setdefault(module, {})["bias"] = _copy(x, dtype)
    elif field == "running_mean":
      batch_stats.setdefault(module, {})["mean"] = _copy(x, dtype)
    elif field == "running_var":
      batch_stats.setdefault(module, {})["var"] = _copy(x, dtype)
    elif field == "num_batches_tracked":
      continue  # Flax keeps no count: momentum is never None in AdderNet
    else:
      raise ValueError(f"unexpected state_dict key {key!r}")
  return {"params": params, "batch_stats": batch_stats}


def flax_to_torch_state_dict(
    variables: Mapping[str, Any],
    num_batches_tracked: Optional[int] = 0,
    dtype: DTypeLike = np.float32,
) -> dict[str, np.ndarray]:
  """Flax ``{"params", "batch_stats"}`` -> a ``TorchAdderNet`` state_dict of arrays.

  Args:
    variables: `adder.model.AdderNet` variables (jax or numpy arrays);
      ``batch_stats`` may be absent (then only parameters are returned).
    num_batches_tracked: value of each BatchNorm's ``num_batches_tracked``
      (int64 scalar array); None leaves the key out. It only matters to
      PyTorch BatchNorms with ``momentum=None``.
    dtype: of the returned floating-point arrays.

  Returns:
    ``{key: numpy array}`` (PyTorch layouts); load it with
    ``model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``.
  """
  out: dict[str, np.ndarray] = {}
  batch_stats = variables.get("batch_stats", {})
  for module, leaves in variables["params"].items():
    for field, value in leaves.items():
      x = _to_numpy(value)
      if field == "kernel":
        if x.ndim == 4:
          out[f"{module}.weight"] = _copy(x.transpose(_HWIO_TO_OIHW), dtype)
        elif x.ndim == 2:
          out[f"{module}.weight"] = _copy(x.T, dtype)
        else:
          raise ValueError(f"{module}/kernel of rank {x.ndim} has no PyTorch counterpart")
      elif field == "scale":
        out[f"{module}.weight"] = _copy(x, dtype)
      elif field == "bias":
        out[f"{module}.bias"] = _copy(x, dtype)
      else:
        raise ValueError(f"unexpected Flax parameter {module}/{field}")
    if module in batch_stats:
      out[f"{module}.running_mean"] = _copy(_to_numpy(batch_stats[module]["mean"]), dtype)
      out[f"{module}.running_var"] = _copy(_to_numpy(batch_stats[module]["var"]), dtype)
      if num_batches_tracked is not None:
        out[f"{module}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  unknown = set(batch_stats) - set(variables["params"])
  if unknown:
    raise ValueError(f"batch_stats without parameters: {sorted(unknown)}")
  return out
