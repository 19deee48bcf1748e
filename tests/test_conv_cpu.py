"""adder's CPU convolution kernels: equal to XLA's, used where they apply, optional."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from adder import conv_cpu
from adder import model as model_lib
from conftest import REPO

# The kernels are built for Linux x86-64; anywhere else the model keeps XLA's
# convolutions (tested below through ADDER_CPU_KERNELS=0).
pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or platform.system() != "Linux"
    or platform.machine() not in ("x86_64", "AMD64"),
    reason="adder's CPU kernels are built for Linux x86-64 CPUs")


def _stock_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _close(got, want):
  """float32 sums of up to a few thousand products, in another order."""
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))


def test_the_kernels_are_built_and_loaded_here():
  assert conv_cpu.describe().startswith("cpu convolutions: adder's direct kernels")


SHAPES = [  # n, h, w, ci, co, kh, kw
    (4, 26, 26, 16, 16, 3, 3),   # the second layer
    (3, 10, 12, 32, 16, 3, 3),   # non-square, more input channels
    (5, 12, 12, 16, 32, 3, 3),   # two vectors of output channels
    (2, 7, 9, 16, 48, 1, 3),     # another kernel
    (1, 9, 9, 16, 16, 5, 5),     # a fifth pixel block, one image
]


@pytest.mark.parametrize("n,h,w,ci,co,kh,kw", SHAPES)
def test_forward_and_both_gradients_equal_xla(n, h, w, ci, co, kh, kw):
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(h * w + co), 3)
  x = jax.random.normal(kx, (n, h, w, ci))
  kernel = jax.random.normal(kk, (kh, kw, ci, co))
  g = jax.random.normal(kg, (n, h - kh + 1, w - kw + 1, co))
  ref, ref_vjp = jax.vjp(_stock_conv, x, kernel)
  ref_dx, ref_dk = ref_vjp(g)
  _close(jax.jit(conv_cpu.forward)(x, kernel), ref)
  _close(jax.jit(conv_cpu.kernel_grad, static_argnums=(2, 3))(x, g, kh, kw), ref_dk)
  _close(jax.jit(conv_cpu.input_grad)(g, kernel), ref_dx)


def test_the_model_runs_them_where_they_apply():
  def hlo(ci, co):
    x, kernel = jnp.ones((2, 8, 8, ci)), jnp.ones((3, 3, ci, co))
    def step(x, k):
      y, pullback = jax.vjp(model_lib.conv_valid, x, k)
      return y, pullback(jnp.ones_like(y))
    return jax.jit(step).lower(x, kernel).as_text()

  ffi = hlo(16, 16)  # forward, the input's gradient as a forward, the kernel's gradient
  assert ffi.count(conv_cpu.FORWARD) == 2 and ffi.count(conv_cpu.KERNEL_GRAD) == 1
  for ci, co in ((1, 16), (16, 20)):  # the first and the last layer stay XLA's
    assert "adder_conv" not in hlo(ci, co)
  assert not conv_cpu.supports((3, 3, 16, 16), jnp.float64)


def test_gradients_inside_a_scan_equal_xla():
  # The backward pass as it runs inside `train_epoch`'s scan.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 10, 10, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16)) * 0.1

  def total(conv):
    def body(k, xs):
      return k - 0.01 * jax.grad(lambda k: jnp.sum(conv(xs, k) ** 2))(k), None
    return jax.jit(lambda k: jax.lax.scan(body, k, x)[0])(kernel)

  want = total(_stock_conv)
  # Three steps of float32 gradients summed in another order, each step's
  # rounding carried into the next.
  np.testing.assert_allclose(total(model_lib.conv_valid), want, rtol=0,
                             atol=1e-5 * float(jnp.abs(want).max()))


PROBE = """
import jax, jax.numpy as jnp
from adder import conv_cpu, model
print(conv_cpu.describe())
x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
print("ffi" if "adder_conv" in jax.jit(model.conv_valid).lower(x, k).as_text() else "xla",
      float(model.conv_valid(x, k)[0, 0, 0, 0]))
"""


@pytest.mark.parametrize("env, says", [
    ({conv_cpu.ENV: "0"}, "cpu convolutions: XLA's (ADDER_CPU_KERNELS=0)"),
    ({"CXX": "false"}, "cpu convolutions: XLA's (adder's kernels unavailable: "),
])
def test_without_them_the_model_keeps_xlas_convolutions(tmp_path, env, says):
  # Switched off, or no compiler (a fresh cache, so nothing to load): one line, XLA's path.
  child_env = {**os.environ, conv_cpu.CACHE_ENV: str(tmp_path), **env}
  r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                     cwd=REPO, env=child_env, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  assert lines[0].startswith(says) and lines[1] == "xla 144.0"


def test_the_compiled_library_is_cached_by_source_and_host(tmp_path):
  env = {**os.environ, conv_cpu.CACHE_ENV: str(tmp_path)}
  for _ in range(2):  # the second process loads what the first compiled
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "ffi 144.0", r.stderr[-2000:]
  built = list(tmp_path.glob("conv_cpu-*.so"))
  assert len(built) == 1 and built[0].name in r.stdout
