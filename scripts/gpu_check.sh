#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network (about 3 minutes):
# build in place with CUDA required (Hopper only, to build fast; another GPU:
# KVTTL_CUDA_ARCHITECTURES=80 for an A100, "native" for the one present), run the swap
# tests (the gpu-marked ones against the CPU backend as the oracle), the kernel
# round trip under compute-sanitizer memcheck when it is present, then the swap
# benchmark (with its max_ctas sweep) and the prefill benchmark against the
# cost-model preset of the GPU found (not with --no-bench). Results go to $OUT
# (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
BENCH=1
[ "${1:-}" = "--no-bench" ] && BENCH=0
export PYTHONUNBUFFERED=1
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
step() { echo "== $* ($(date +%T))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  step build
  KVTTL_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${KVTTL_CUDA_ARCHITECTURES:-90}" \
    $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  $PY -c "import kvttl; print(kvttl.build_info(), kvttl.cuda_probe())" || exit 1
  step tests
  # two processes: a crash in one does not hide the other's results
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/swap/test_swap_cpu.py tests/core/test_native_module.py 2>&1
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/swap/test_swap_gpu.py 2>&1
  if command -v compute-sanitizer >/dev/null; then
    step compute-sanitizer
    timeout 75 compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PY -m pytest -q -p no:cacheprovider -m gpu tests/swap -k "round_trip and kernel and (8192 or 65539) or host_copier or grid_and_tails and 4099" 2>&1
    echo "compute-sanitizer exit $?"
  fi
  if [ $BENCH = 1 ]; then
    step bench_swap
    timeout 200 $PY benchmarks/bench_swap.py --json "$OUT/bench_swap.json" --repeats 5 2>&1
    step bench_prefill_gpu
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)" in
      *H100*) PRESET=llama-3.1-8b-h100 ;;
      *) PRESET=llama-3.1-8b-h200 ;;
    esac
    timeout 120 $PY benchmarks/bench_prefill_gpu.py --preset $PRESET --json "$OUT/bench_prefill_gpu.json" --repeats 5 2>&1
  fi
  step done
} | tee "$OUT/gpu_check.log"
