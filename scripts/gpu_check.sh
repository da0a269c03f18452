#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network (under 8 minutes):
# build in place, run the gpu-marked tests (under compute-sanitizer memcheck when
# present), then the swap and core benchmarks. Results go to $OUT (default ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi || true
  python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
  python -c "import kvttl; print(kvttl.build_info(), kvttl.cuda_probe())"
  timeout 180 python -m pytest -q -m gpu tests 2>&1
  if command -v compute-sanitizer >/dev/null; then
    timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
      python -m pytest -q -m gpu tests/swap -k "round_trip and kernel and 8192" 2>&1
  fi
  timeout 200 python benchmarks/bench_swap.py --json "$OUT/bench_swap.json" --repeats 5 2>&1
  # vLLM with async scheduling (on by default on GPUs) under KvttlScheduler, where vLLM is installed
  if python -c "import vllm" 2>/dev/null; then
    timeout 120 python -m pytest -q tests/adapters/test_vllm_async.py tests/conformance -k vllm 2>&1
  else
    echo "vLLM is not installed here: the async-scheduling engine check did not run"
  fi
  timeout 60 python benchmarks/bench_core.py --json "$OUT/bench_core.json" --repeats 5 --max-leases 1e5 2>&1
} | tee "$OUT/gpu_check.log"
