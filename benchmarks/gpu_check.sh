#!/usr/bin/env bash
# One prepared GPU run (issue 14, item 6-7): correctness on the device, then every benchmark on the
# full-depth LLaVA-1.5-7B-shaped model (24 vision + 32 LLM layers, bf16, sdpa, random weights); where vLLM
# is installed, the serving benchmark (Qwen2.5-VL-3B-shaped, full depth) too.
# Sized for one H200-class GPU: about 10 minutes in all (15 with serving), each step under its own time limit.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (the device runner's folder) or ./gpu_results
#   bash benchmarks/gpu_check.sh --smoke    # dry run on this machine's CPU: every step with --device cpu
#                                           # --smoke (tiny widths), no CUDA check; results in ./gpu_results_smoke
#
# Needs: torch with CUDA, transformers, and this repo installed (pip install -e ".[test]").
set -u
cd "$(dirname "$0")/.."
SMOKE=0
case "${1:-}" in
    "") ;;
    --smoke) SMOKE=1 ;;
    *) echo "unknown option '$1'; usage: bash benchmarks/gpu_check.sh [--smoke]" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
PY="${PYTHON:-python}"
if [ "$SMOKE" = 1 ]; then
    RESULTS="${OUT:-gpu_results_smoke}"
    DEVICE=(--device cpu)
    FLAGS=(--smoke)  # tiny widths; the step arguments below are kept, so their parsing is checked too
    SCALE=5  # time limits x5: the device suites alone take ~90 s of a 2-core CPU, more when it is shared
else
    RESULTS="${OUT:-gpu_results}"
    DEVICE=(--device cuda)
    FLAGS=()
    SCALE=1
fi
mkdir -p "$RESULTS"
: > "$RESULTS/summary.txt"
"$PY" -c "import torch, transformers, tokprune" || {
    echo "$PY cannot import torch, transformers and tokprune: install the repo (pip install -e \".[test]\") or set PYTHON" >&2
    exit 1
}
if [ "$SMOKE" = 0 ]; then
    "$PY" - <<'PY' || exit 1
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine (dry run: --smoke)"
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/nvidia-smi.txt" 2>&1
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit (x SCALE), log to $RESULTS/NAME.log, keep going on failure
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" | tee -a "$RESULTS/summary.txt"
}

bench() {  # bench NAME SECONDS SCRIPT ARGS...: a benchmark on the device (every script offers --smoke: tested)
    local name=$1 limit=$2 script=$3
    shift 3
    local fewer=()  # smoke: the GPU's arguments are kept (their parsing is checked) but one round of few steps
    if [ "$SMOKE" = 1 ]; then
        for arg in "$@"; do
            case "$arg" in
                --repeats) fewer+=(--repeats 1) ;;
                --steps) fewer+=(--steps 2) ;;
            esac
        done
    fi
    step "$name" "$limit" "$PY" "$script" "${DEVICE[@]}" "$@" "${FLAGS[@]}" "${fewer[@]}"
}

# the device suites: CUDA (and bf16/fp16) on the GPU; on the CPU the same suites compare the CPU with itself
step tests    120 "$PY" -m pytest -q -p no:randomly tests/test_device.py tests/test_bench_common.py "${DEVICE[@]}"
bench prefill   60 benchmarks/bench_prefill.py --repeats 5
bench families 120 benchmarks/bench_prefill.py --family next,qwen --repeats 5
bench decode    90 benchmarks/bench_decode.py --batches 1,8,32,64 --steps 16 --repeats 3
bench memory    60 benchmarks/bench_memory.py --batches 1,16,32 --steps 16 --budget-gb 80
bench growth    80 benchmarks/bench_growth.py --layout size --repeats 5
bench tiles     50 benchmarks/bench_growth.py --layout tiles --repeats 5
bench next      50 benchmarks/bench_growth.py --layout next --repeats 5
bench generate  90 benchmarks/bench_generate.py --batches 1,32 --new-tokens 8,128 --repeats 2
bench overhead  60 benchmarks/bench_overhead.py --batches 1,32 --repeats 5
bench primitives 40 benchmarks/bench_primitives.py --quick
# serving (issue 24): tokprune inside vLLM vs no spec, full depth in bf16, with where a request's time goes;
# needs vLLM importable by $PY (pip install vllm==0.32.0: docs/serving.md), reported as skipped otherwise
if "$PY" -c "import vllm" > /dev/null 2>&1; then
    bench serve 300 benchmarks/bench_serve.py --concurrency 1,8,32 --rounds 3 --profile
else
    printf '%-10s skipped    vLLM is not importable by %s (docs/serving.md: install)\n' serve "$PY" | tee -a "$RESULTS/summary.txt"
fi
echo "== $RESULTS/summary.txt"
cat "$RESULTS/summary.txt"
! grep -q 'rc=[1-9]' "$RESULTS/summary.txt"  # exit status: 0 when every step passed
