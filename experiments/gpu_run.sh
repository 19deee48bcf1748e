#!/usr/bin/env bash
# One command for an offline GPU host without TensorFlow: check what the run
# needs, train the default recipe (20 epochs) on the GPU, then run the
# benchmark there. Everything lands in one output folder.
#
# Command (from anywhere; it works from the repository root it lives in):
#
#   experiments/gpu_run.sh --data-dir .data/tfds --wheels .whl --out runs/gpu
#
#   --data-dir DIR  MNIST prepared as ArrayRecord by `python -m adder.data` on a
#                   machine with TensorFlow (read here without it). Required.
#   --wheels DIR    wheels the host lacks (tensorflow-datasets, array_record and
#                   their small dependencies, tensorboardX), installed with
#                   --no-deps into $TMPDIR/adder-site, which goes on PYTHONPATH.
#                   Optional.
#   --out DIR       output folder (default: runs/gpu): train.log and run/ (the
#                   workdir of adder.train), benchmark.log, BENCHMARKS.gpu.md and
#                   bench.json (the benchmark's section and figures).
#   --epochs E --seeds S --steps N   the benchmark's size (default: 5, 1, 300).
#   --dry-run       check the prerequisites and print the plan; train nothing.
#                   Without a GPU it says so and still exits 0.
#
# last run: 2026-11-27 on one NVIDIA H200, 179 s in all (21 s of checks, 38 s of
# training, 120 s of benchmark); its output is docs/gpu-run-h200/gpu_run.log.
# The default recipe was then the original one (no augmentation, no consistency
# term): the current default has not run on a GPU yet.
#
# Sizing: the whole script must end within 8 minutes on one H100 or H200. The
# 20-epoch training is small there (a few seconds per epoch plus compilation).
# The benchmark runs 3 pipelines x seeds x epochs; its slowest, the PyTorch
# per-sample DataLoader with 0 workers, took 4.3-5.9 s per epoch of 60,000
# images at batch 128 on such a host, so 5 epochs x 1 seed (x 3 pipelines,
# plus 300 timed steps each and the exhaustive evaluations) stays within about
# 3-4 minutes (120 s on the H200). Raise --epochs/--seeds only where more time
# is available.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

absolute() {  # a path made absolute against the caller's working directory
  case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac
}

data_dir="" wheels="" out="runs/gpu" epochs=5 seeds=1 steps=300 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir|--wheels|--out|--epochs|--seeds|--steps)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --data-dir) data_dir="$2" ;; --wheels) wheels="$2" ;; --out) out="$2" ;;
        --epochs) epochs="$2" ;; --seeds) seeds="$2" ;; --steps) steps="$2" ;;
      esac
      shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$data_dir" ] || die "--data-dir is required: MNIST prepared by python -m adder.data"
for n in epochs seeds steps; do
  [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "--$n must be a positive integer, got '${!n}'"
done
data_dir="$(absolute "$data_dir")"
out="$(absolute "$out")"
[ -z "$wheels" ] || wheels="$(absolute "$wheels")"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${PYTHON:-python3}"
command -v "$py" >/dev/null || die "$py not found (set \$PYTHON to the Python holding jax and torch)"
start_all=$SECONDS

echo "== setup"
start=$SECONDS
site=""
if [ -n "$wheels" ]; then
  compgen -G "$wheels/*.whl" >/dev/null || die "no .whl files in $wheels"
  site="${TMPDIR:-/tmp}/adder-site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    "$wheels"/*.whl || die "could not install the wheels of $wheels into $site"
  echo "installed $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site"
fi
export PYTHONPATH="${site:+$site:}$repo${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONUNBUFFERED=1  # the logs fill as the run goes, even if it is cut short
echo "PYTHONPATH=$PYTHONPATH"

# Imports, and the devices each framework sees (probed without holding GPU memory).
probe="$(XLA_PYTHON_CLIENT_PREALLOCATE=false "$py" - <<'EOF'
import importlib
import sys

missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "torch", "matplotlib", "PIL",
             "tensorflow_datasets", "array_record.python.array_record_data_source",
             "tensorboardX", "adder"):
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
  print("error: cannot import " + "; ".join(missing), file=sys.stderr)
  sys.exit(2)
import jax
import torch
print(f"python {sys.version.split()[0]} at {sys.executable}; adder from {sys.modules['adder'].__path__[0]}")
print("tensorflow_datasets " + sys.modules["tensorflow_datasets"].__version__
      + ", tensorboardX " + sys.modules["tensorboardX"].__version__)
print(f"JAX {jax.__version__}: backend {jax.default_backend()}, devices {jax.devices()}")
cuda = torch.cuda.is_available()
print(f"PyTorch {torch.__version__}: CUDA {'available, ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
print("gpu" if jax.default_backend() == "gpu" and cuda else "no-gpu")
EOF
)"
printf '%s\n' "$probe" | sed '$d'
gpu="$(printf '%s\n' "$probe" | tail -n 1)"
"$py" -m adder.data --data-dir "$data_dir" --check-only
echo "== setup: $((SECONDS - start)) s"

train=("$py" -m adder.train --require-gpu --data-dir "$data_dir" --workdir "$out/run")
bench=("$py" experiments/benchmark.py --device gpu --data-dir "$data_dir"
       --out "$out/BENCHMARKS.gpu.md" --json "$out/bench.json"
       --epochs "$epochs" --seeds "$seeds" --steps "$steps")
echo "== plan (from $repo, PYTHONPATH as above; output in $out)"
echo "train:     $(printf '%q ' "${train[@]}")2>&1 | tee $out/train.log"
echo "benchmark: $(printf '%q ' "${bench[@]}")2>&1 | tee $out/benchmark.log"

if [ "$gpu" != gpu ]; then
  if [ "$dry_run" = 1 ]; then
    echo "no GPU here (both JAX and PyTorch must see one): a real run would stop here"
    exit 0
  fi
  die "no GPU: JAX and PyTorch must both see one (see the lines above)"
fi
if [ "$dry_run" = 1 ]; then
  echo "dry run: GPU found, nothing trained"
  exit 0
fi

mkdir -p "$out"
echo "== train"
start=$SECONDS
"${train[@]}" 2>&1 | tee "$out/train.log"
echo "== train: $((SECONDS - start)) s"

echo "== benchmark"
start=$SECONDS
"${bench[@]}" 2>&1 | tee "$out/benchmark.log"
echo "== benchmark: $((SECONDS - start)) s"
echo "== all: $((SECONDS - start_all)) s; results in $out"
