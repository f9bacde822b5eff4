#!/usr/bin/env bash
# One prepared GPU run (issue 14, item 6-7): correctness on the device, then every benchmark on the
# full-depth LLaVA-1.5-7B-shaped model (24 vision + 32 LLM layers, bf16, sdpa, random weights).
# Sized for one H200-class GPU: about 10 minutes in all, each step under its own time limit.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (the device runner's folder) or ./gpu_results
#
# Needs: torch with CUDA, transformers, and this repo installed (pip install -e ".[test]").
set -u
cd "$(dirname "$0")/.."
RESULTS="${OUT:-gpu_results}"
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python - <<'PY' || exit 1
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/nvidia-smi.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$RESULTS/summary.txt"
}

step tests    120 python -m pytest -q -p no:randomly tests/test_device.py tests/test_bench_common.py --device cuda
step prefill   60 python benchmarks/bench_prefill.py --device cuda --repeats 5
step decode    90 python benchmarks/bench_decode.py --device cuda --batches 1,8,32,64 --steps 16 --repeats 3
step memory    60 python benchmarks/bench_memory.py --device cuda --batches 1,16,32 --steps 16 --budget-gb 80
step growth    80 python benchmarks/bench_growth.py --device cuda --layout size --repeats 5
step tiles     50 python benchmarks/bench_growth.py --device cuda --layout tiles --repeats 5
step generate  90 python benchmarks/bench_generate.py --device cuda --batches 1,32 --new-tokens 8,128 --repeats 2
step overhead  60 python benchmarks/bench_overhead.py --device cuda --batches 1,32 --repeats 5
step primitives 40 python benchmarks/bench_primitives.py --device cuda --quick
cat "$RESULTS/summary.txt"
