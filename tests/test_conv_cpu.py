"""adder's CPU convolution kernels: equal to XLA's, used where they apply, fenced.

The fences run everywhere: the switch, the environment variable, a missing or
failing compiler, a compile past its time limit and kernels that fail the
self-check each leave the model on XLA's convolutions, with one line saying
why (fake compilers and wrong kernels stand in for broken ones). Only the
tests of the compiled kernels themselves need Linux x86-64 (CI's machine).
"""

import logging
import os
import shlex
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

needs_kernels = pytest.mark.skipif(
    not conv_cpu._host_supported() or jax.default_backend() != "cpu",
    reason="adder's CPU kernels are built for Linux x86-64 CPUs")


def _stock_conv(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _close(got, want):
  """float32 sums of up to a few thousand products, in another order."""
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()))


def _model_conv_hlo(ci=16, co=16):
  """The lowered text of the model's convolution, forward and both gradients (a fresh trace)."""
  x, kernel = jnp.ones((2, 8, 8, ci)), jnp.ones((3, 3, ci, co))
  def step(x, k):
    y, pullback = jax.vjp(model_lib.conv_valid, x, k)
    return y, pullback(jnp.ones_like(y))
  return jax.jit(step).lower(x, kernel).as_text()


def _assert_model_runs_xla():
  """The model's 16-channel convolution lowers to no FFI call and computes XLA's values."""
  assert not conv_cpu.supports((3, 3, 16, 16), jnp.float32)
  assert "adder_conv" not in _model_conv_hlo()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16))
  np.testing.assert_array_equal(jax.jit(model_lib.conv_valid)(x, kernel), _stock_conv(x, kernel))


# --- the fences, on every platform --------------------------------------------------


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
  """`conv_cpu._load` run anew as if on Linux x86-64, with an empty library cache.

  JAX's trace caches are cleared on the way in and out, so that no trace made
  with the kernels in one state is reused in another.
  """
  monkeypatch.setenv(conv_cpu.CACHE_ENV, str(tmp_path))
  monkeypatch.delenv(conv_cpu.ENV, raising=False)
  monkeypatch.setattr(conv_cpu, "_host_supported", lambda: True)
  conv_cpu._load.cache_clear()
  jax.clear_caches()
  yield tmp_path
  conv_cpu._load.cache_clear()
  jax.clear_caches()


def _python_compiler(code: str) -> str:
  """A ``$CXX`` that runs `code` in Python (given the compiler's arguments) instead of compiling."""
  return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def _one_warning(caplog) -> str:
  records = [r for r in caplog.records if r.name == conv_cpu.__name__]
  assert len(records) == 1 and records[0].levelno == logging.WARNING
  message = records[0].getMessage()
  assert "\n" not in message
  return message


def test_a_compile_past_its_time_limit_falls_back_to_xla(fresh_load, monkeypatch, caplog):
  monkeypatch.setenv("CXX", _python_compiler("import time; time.sleep(120)"))
  monkeypatch.setattr(conv_cpu, "COMPILE_TIMEOUT_S", 0.5)
  line = conv_cpu.describe()
  assert line.startswith("cpu convolutions: XLA's (adder's kernels unavailable: ")
  assert line.endswith(" took over 0.5 s and was stopped)")
  assert _one_warning(caplog) == line
  assert list(fresh_load.iterdir()) == []  # no library, no leftover build folder
  _assert_model_runs_xla()


@pytest.mark.parametrize("compiler, says", [
    ("adder-no-such-compiler", "No such file or directory"),
    (_python_compiler("raise SystemExit('conv_cpu.cc:1: error: no vectors\\nstopped')"),
     "failed: conv_cpu.cc:1: error: no vectors stopped"),
])
def test_without_a_working_compiler_the_model_keeps_xlas_convolutions(
    fresh_load, monkeypatch, caplog, compiler, says):
  monkeypatch.setenv("CXX", compiler)
  line = conv_cpu.describe()
  assert line.startswith("cpu convolutions: XLA's (adder's kernels unavailable: ") and says in line
  assert says in _one_warning(caplog)
  _assert_model_runs_xla()


def _right_kernel_grad(x, g, kh, kw):
  kernel = jnp.zeros((kh, kw, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda k: _stock_conv(x, k), kernel)[1](g)[0]


def _nan_at_first(y):
  return y.at[(0,) * y.ndim].set(jnp.nan)


WRONG_KERNELS = {  # name: (forward, kernel_grad, what the self-check says)
    "forward scaled": (lambda x, k: _stock_conv(x, k) * 1.001, _right_kernel_grad,
                       "its forward is off XLA's by up to"),
    "one NaN": (lambda x, k: _nan_at_first(_stock_conv(x, k)), _right_kernel_grad,
                "its forward is off XLA's by up to nan"),
    # Right on the check's image, wrong on the padded output gradient (more rows).
    "input gradient's taps unflipped": (
        lambda x, k: _stock_conv(x, k if x.shape[1] == conv_cpu.CHECK_CASE[1]
                                 else jnp.flip(k, (0, 1))),
        _right_kernel_grad, "its input gradient is off XLA's"),
    "kernel gradient flipped": (
        _stock_conv, lambda *a: jnp.flip(_right_kernel_grad(*a), (0, 1)),
        "its kernel gradient is off XLA's"),
    "kernel gradient's first 16 output channels only": (
        _stock_conv, lambda *a: _right_kernel_grad(*a)[..., :16],
        "its kernel gradient has shape (3, 3, 16, 16), XLA's (3, 3, 16, 32)"),
}


@pytest.mark.parametrize("name", WRONG_KERNELS)
def test_kernels_that_fail_the_self_check_leave_xlas_convolutions(
    fresh_load, monkeypatch, caplog, name):
  forward, kernel_grad, says = WRONG_KERNELS[name]
  monkeypatch.setattr(conv_cpu, "_build",
                      lambda: (conv_cpu.Kernels(forward, kernel_grad), "wrong.so"))
  line = conv_cpu.describe()
  assert line.startswith("cpu convolutions: XLA's (adder's kernels failed their self-check: "
                         + says), line
  assert says in _one_warning(caplog)
  _assert_model_runs_xla()


def test_kernels_equal_to_xlas_pass_the_self_check_once_per_process(fresh_load, monkeypatch):
  checks = []
  self_check = conv_cpu._self_check
  monkeypatch.setattr(conv_cpu, "_self_check", lambda k: checks.append(k) or self_check(k))
  monkeypatch.setattr(conv_cpu, "_build",
                      lambda: (conv_cpu.Kernels(_stock_conv, _right_kernel_grad), "right.so"))
  for _ in range(3):
    assert conv_cpu.describe() == "cpu convolutions: adder's direct kernels, built for this CPU " \
        "(right.so)"
  assert len(checks) == 1


def test_adder_cpu_kernels_0_builds_nothing(fresh_load, monkeypatch):
  monkeypatch.setenv(conv_cpu.ENV, "0")
  monkeypatch.setattr(conv_cpu, "_build", lambda: pytest.fail("built with ADDER_CPU_KERNELS=0"))
  assert conv_cpu.describe() == "cpu convolutions: XLA's (ADDER_CPU_KERNELS=0)"
  _assert_model_runs_xla()


def test_switched_off_the_model_keeps_xlas_convolutions():
  # Wherever the kernels load, a function traced with them (forward and
  # backward) is traced again inside the switch; elsewhere both traces are XLA's.
  def step(x, k):
    y, pullback = jax.vjp(model_lib.conv_valid, x, k)
    return y, pullback(jnp.ones_like(y))
  x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
  jitted = jax.jit(step)
  default = jitted.lower(x, k).as_text()
  with conv_cpu.use_kernels(False):
    assert conv_cpu.describe() == ("cpu convolutions: XLA's (switched off: "
                                   "adder.conv_cpu.use_kernels(False))")
    assert "adder_conv" not in jitted.lower(x, k).as_text()
    _assert_model_runs_xla()
    with conv_cpu.use_kernels(True):  # nests
      assert jitted.lower(x, k).as_text() == default
  assert jitted.lower(x, k).as_text() == default
  assert default.count("adder_conv") == (3 if conv_cpu.supports(k.shape, k.dtype) else 0)


# --- the compiled kernels (Linux x86-64) ------------------------------------------


@needs_kernels
def test_the_kernels_are_built_and_loaded_here():
  assert conv_cpu.describe().startswith("cpu convolutions: adder's direct kernels")
  kernels, name = conv_cpu._build()
  assert conv_cpu._self_check(kernels) is None and name in conv_cpu.describe()


SHAPES = [  # n, h, w, ci, co, kh, kw
    (4, 26, 26, 16, 16, 3, 3),   # the second layer
    (3, 10, 12, 32, 16, 3, 3),   # non-square, more input channels
    (5, 12, 12, 16, 32, 3, 3),   # two vectors of output channels
    (2, 7, 9, 16, 48, 1, 3),     # another kernel
    (1, 9, 9, 16, 16, 5, 5),     # a fifth pixel block, one image
]


@needs_kernels
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


@needs_kernels
def test_the_model_runs_them_where_they_apply():
  ffi = _model_conv_hlo(16, 16)  # forward, the input's gradient as a forward, the kernel's gradient
  assert ffi.count(conv_cpu.FORWARD) == 2 and ffi.count(conv_cpu.KERNEL_GRAD) == 1
  for ci, co in ((1, 16), (16, 20)):  # the first and the last layer stay XLA's
    assert "adder_conv" not in _model_conv_hlo(ci, co)
  assert not conv_cpu.supports((3, 3, 16, 16), jnp.float64)


@needs_kernels
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


# A fresh process whose first use of the kernels is inside a trace: they are
# built, loaded and self-checked there, and the trace holds only the model's call.
PROBE = """
import jax, jax.numpy as jnp
from adder import conv_cpu, model
x, k = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
hlo = jax.jit(model.conv_valid).lower(x, k).as_text()
print(conv_cpu.describe())
print("ffi" if "adder_conv" in hlo else "xla", hlo.count("custom_call"),
      float(model.conv_valid(x, k)[0, 0, 0, 0]))
"""


@needs_kernels
def test_the_compiled_library_is_cached_by_source_and_host(tmp_path):
  env = {**os.environ, conv_cpu.CACHE_ENV: str(tmp_path)}
  env.pop(conv_cpu.ENV, None)
  for _ in range(2):  # the second process loads what the first compiled
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "ffi 1 144.0", r.stderr[-2000:]
    assert "cpu convolutions" not in r.stderr  # no warning
  built = list(tmp_path.glob("conv_cpu-*.so"))
  assert len(built) == 1 and built[0].name in r.stdout
