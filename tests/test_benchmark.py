"""The benchmark script keeps working: ``--quick`` end to end, and its pure helpers.

No timing is asserted: only that every figure exists, is a positive finite
number, and that the report carries its tables and command.
"""

import importlib.util
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adder import model as model_lib
from adder.config import Config
from conftest import REPO


def _load_benchmark():
  path = REPO / "experiments" / "benchmark.py"
  spec = importlib.util.spec_from_file_location("benchmark", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


bench = _load_benchmark()

REQUIRED = ("jax_train_img_s", "torch_dataloader_train_img_s", "torch_inmemory_train_img_s",
            "jax_eval_img_s", "torch_eval_img_s")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("benchmark")
  json_path, out_path = tmp / "figures.json", tmp / "BENCH.md"
  argv = ["--quick", "--device", "cpu", "--json", str(json_path), "--out", str(out_path)]
  assert bench.main(argv) == 0
  return argv, json.loads(json_path.read_text()), out_path.read_text()


def test_quick_json_has_positive_finite_figures(quick_run):
  _, figures, _ = quick_run
  for key in REQUIRED + ("jax_epoch_img_s", "torch_inmemory_epoch_img_s",
                         "jax_over_torch_dataloader_epoch_img_s", "jax_compile_s", "jax_epoch_s",
                         "jax_peak_rss_mib",
                         "torch_inmemory_peak_rss_mib", "torch_dataloader_epoch_s"):
    value = figures[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
  assert figures["jax_params"] == figures["torch_dataloader_params"] == \
      figures["torch_inmemory_params"] == 17_393
  for name in ("jax", "torch_dataloader", "torch_inmemory"):
    assert 0.0 <= figures[f"{name}_final_exhaustive_joint_acc_mean"] <= 1.0


def test_quick_markdown_has_tables_and_command(quick_run):
  argv, _, markdown = quick_run
  assert markdown.startswith("# Benchmarks")
  assert "<!-- benchmark:cpu-quick:begin -->" in markdown
  assert "## CPU: " in markdown
  assert ("| figure | (a) JAX adder.train | (b) PyTorch DataLoader | "
          "(c) PyTorch in memory | (a)/(b) | (a)/(c) | better |") in markdown
  assert ("| figure | (a) JAX adder.train | (b) PyTorch DataLoader | "
          "(c) PyTorch in memory | (a)/(b) | (a)/(c) |\n") in markdown
  assert "### Speed and memory" in markdown and "### Accuracy" in markdown
  assert f"`{bench.command_line(argv)}`" in markdown
  assert bench.command_line(argv).startswith("python experiments/benchmark.py --quick")
  for word in ("jax", "jaxlib", "flax", "optax", "torch", "threads", "backend"):
    assert word in markdown


def test_quick_markdown_renders_again_from_its_json(quick_run):
  # --from-json's path: the figures alone give the same section, byte for byte.
  _, figures, markdown = quick_run
  section = bench.render_markdown(*bench.from_figures(figures))
  assert f"<!-- benchmark:cpu-quick:begin -->\n{section.rstrip()}\n" in markdown


def test_benchmarks_md_cpu_section_is_rendered_from_its_json(tmp_path, capsys):
  """BENCHMARKS.md's CPU section is `--from-json docs/benchmark-cpu.json`'s output."""
  out = tmp_path / "B.md"
  assert bench.main(["--from-json", str(REPO / "docs" / "benchmark-cpu.json"),
                     "--out", str(out)]) == 0
  begin, end = "<!-- benchmark:cpu:begin -->", "<!-- benchmark:cpu:end -->"

  def section(text):
    return text[text.index(begin):text.index(end)]

  assert section(out.read_text()) == section((REPO / "BENCHMARKS.md").read_text())
  assert "| training throughput, training runs' epochs" in capsys.readouterr().out


@pytest.mark.parametrize("flags, switched_off", [(["--xla-convolutions"], True), ([], False)])
def test_xla_convolutions_switches_the_kernels_off_around_the_jax_worker(
    tmp_path, monkeypatch, flags, switched_off):
  from adder import conv_cpu, devices  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(devices, "configure_cpu_devices", lambda batch_size: "as configured")
  monkeypatch.setattr(bench, "_run_jax",
                      lambda a, dataset: {"convolutions": conv_cpu.describe()})
  data, result = tmp_path / "data.npz", tmp_path / "jax.json"
  np.savez(data, train_labels=np.zeros(4, np.int32))
  a = bench.parse_args(["--quick", *flags, "--_worker", "jax", "--_data", str(data),
                        "--_result", str(result), "--_device", "cpu"])
  assert bench._run_worker(a) == 0
  said = json.loads(result.read_text())["convolutions"]
  assert ("use_kernels(False)" in said) == switched_off, said


def test_time_to_target_sums_epoch_seconds_until_reached():
  history = [{"epoch": 1, "seconds": 3.0, "test_joint_acc": 0.95},
             {"epoch": 2, "seconds": 2.0, "test_joint_acc": 0.991},
             {"epoch": 3, "seconds": 2.0, "test_joint_acc": 0.995}]
  assert bench.time_to_target(history) == (2, 5.0)
  assert bench.time_to_target(history[:1]) is None


def test_write_section_replaces_only_its_own_section(tmp_path):
  path = str(tmp_path / "B.md")
  bench.write_section(path, "cpu", "## CPU\nold\n")
  bench.write_section(path, "gpu", "## GPU\nkept\n")
  bench.write_section(path, "cpu", "## CPU\nnew\n")
  text = open(path).read()
  assert text.startswith(bench.FILE_HEADER)
  assert "new" in text and "old" not in text and "kept" in text
  assert text.count("<!-- benchmark:cpu:begin -->") == 1
  assert text.index("## CPU") < text.index("## GPU")


def _load_conv_probe():
  sys.path.insert(0, str(REPO / "experiments"))
  import conv_probe  # pylint: disable=g-import-not-at-top
  return conv_probe


def test_conv_probe_layer_shapes_are_the_models():
  """`conv_probe --cpu-layers` times the convolutions the model runs, no others."""
  conv_probe = _load_conv_probe()
  config = Config()
  model = model_lib.create_model(config)
  variables = model_lib.init_variables(model, jax.random.PRNGKey(0))
  images, numbers = jnp.zeros((2, 28, 28, 1)), jnp.zeros((2,), jnp.int32)
  _, state = model.apply(variables, images, numbers, train=False,
                         capture_intermediates=lambda m, _: isinstance(m, model_lib.Conv))
  seen = []
  for i in range(len(config.conv_features)):
    out = state["intermediates"][f"conv{i}"]["__call__"][0]
    kernel = variables["params"][f"conv{i}"]["kernel"]
    seen.append((out.shape[1] + 2, kernel.shape[2], kernel.shape[3]))
  assert conv_probe.conv_layer_shapes(config) == seen == [
      (28, 1, 16), (26, 16, 16), (12, 16, 16), (10, 16, 16), (4, 16, 20)]


def test_conv_probe_layers_table_sums_the_layers():
  conv_probe = _load_conv_probe()
  columns = conv_probe.LAYER_COLUMNS
  result = {"batch": 128, "torch_threads": 2,
            "28x28x1->16": {c: 1.0 + i for i, c in enumerate(columns)},
            "26x26x16->16": {c: 0.5 for c in columns}}
  lines = conv_probe.layers_table(result).splitlines()
  assert len(lines) == 2 + 2 + 1  # header, rule, two layers, totals
  assert lines[0].split(" | ")[1:3] == ["adder forward", "XLA forward"]
  assert lines[2].startswith("| 28x28x1->16 | 1.00 | 2.00 |")
  assert lines[-1] == "| all layers | 1.50 | 2.50 | 3.50 | 4.50 | 5.50 | 6.50 | 7.50 | 8.50 |"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's own library choice")
def test_conv_probe_options_take_convolutions_from_ynnpack_only():
  """`conv_probe --cpu-ynn`'s compiler options: a 20-feature convolution leaves YNNPACK,
  the Dense layers' products stay, and a 16-feature one was never there."""
  conv_probe = _load_conv_probe()

  def fusions(features, options, dense=False):
    def f(x, k, w):
      y = conv_probe.lax_conv(x, k)
      return y.reshape(y.shape[0], -1) @ w if dense else y
    x, k = jnp.ones((128, 6, 6, 16)), jnp.ones((3, 3, 16, features))
    w = jnp.ones((16 * features, 32))
    return conv_probe._ynn_fusions(jax.jit(f, compiler_options=options).lower(x, k, w).compile())

  wide, narrow = 20, 16
  assert fusions(wide, None) == 1 and fusions(wide, conv_probe.YNN_WITHOUT_CONVOLUTIONS) == 0
  assert fusions(narrow, None) == 0
  assert fusions(wide, None, dense=True) == 2
  assert fusions(wide, conv_probe.YNN_WITHOUT_CONVOLUTIONS, dense=True) == 1
