"""CPU device choice: JAX's one device, never overriding the user's settings."""

import json
import os
import subprocess
import sys

import pytest

from adder import devices
from conftest import REPO


@pytest.mark.parametrize("env,says", [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, "as set by the user (XLA_FLAGS)"),
    ({"JAX_NUM_CPU_DEVICES": "3"}, "as set by the user (JAX_NUM_CPU_DEVICES)"),
    ({"JAX_PLATFORMS": "cuda"}, "not used"),
])
def test_user_settings_are_left_alone(env, says):
  before = dict(env)
  line = devices.configure_cpu_devices(128, env=env)
  assert says in line
  assert env == before  # nothing added to the user's environment


_PROBE = """
import json, os
from adder import devices
line = devices.configure_cpu_devices(128)
import jax
print(json.dumps({"line": line, "devices": jax.device_count(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "cores": devices.usable_cores()}))
"""


def _probe(extra_env):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", "JAX_PLATFORMS")}
  env.update(extra_env, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                     timeout=120, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_device_and_no_flags_by_default():
  out = _probe({})
  assert out["devices"] == 1
  assert f"1 device (JAX's default) over {out['cores']} core(s), batch 128" in out["line"]
  assert out["xla_flags"] == ""


def test_other_xla_flags_are_kept():
  out = _probe({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"})
  assert out["xla_flags"] == "--xla_cpu_enable_fast_math=false"


def test_a_user_device_count_wins():
  out = _probe({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
  assert out["devices"] == 3 and "as set by the user" in out["line"]
  out = _probe({"JAX_NUM_CPU_DEVICES": "2"})
  assert out["devices"] == 2 and "as set by the user (JAX_NUM_CPU_DEVICES)" in out["line"]


def test_nothing_changes_where_a_gpu_will_train(monkeypatch):
  monkeypatch.setattr(devices, "gpu_likely", lambda: True)
  env = {}
  assert "GPU" in devices.configure_cpu_devices(128, env=env)
  assert env == {}


def _recorded_updates(monkeypatch) -> dict:
  """jax.config.update calls made by `adder.devices`, recorded instead of applied."""
  calls = {}
  monkeypatch.setattr(devices.jax.config, "update", calls.__setitem__)
  monkeypatch.setattr(devices, "usable_cores", lambda: 2)
  monkeypatch.setattr(devices, "gpu_likely", lambda: False)
  return calls


def test_each_of_several_processes_trains_its_share_and_uses_gloo(monkeypatch):
  calls = _recorded_updates(monkeypatch)
  line = devices.configure_cpu_devices(32, env={}, processes=2)
  assert calls == {"jax_cpu_collectives_implementation": "gloo"}
  assert "1 device (JAX's default) over 2 core(s), batch 16 per process" in line
  assert "Gloo collectives across 2 processes" in line


def test_several_processes_keep_the_users_collectives_and_devices(monkeypatch):
  calls = _recorded_updates(monkeypatch)
  env = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi", "JAX_NUM_CPU_DEVICES": "1"}
  line = devices.configure_cpu_devices(32, env=env, processes=2)
  assert calls == {} and env == {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "mpi",
                                 "JAX_NUM_CPU_DEVICES": "1"}
  assert "as set by the user" in line
