#!/usr/bin/env bash
# The GPU check, under 8 minutes on one H100: the model's tests on CUDA, then tokens/s and MFU of the default
# training step against the GPT-2 baseline (bench/bench_gpu_step.py), printed as one line.
#
#     bash bench/gpu.sh [--nanogpt PATH_TO_NANOGPT_CHECKOUT]
#     bash bench/gpu.sh --cpu      # the same at tiny shapes on the CPU, in seconds: checks the script works
#
# Exit 0 with the line on stdout; 1 when a test fails (its output is printed); 2 for a bad argument.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
device=cuda
if [[ "${1:-}" == "--cpu" ]]; then
    device=cpu
fi

# Tests taking a device run on CUDA where there is one: select those (on the CPU, the CPU ones).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$python" -m pytest tests/test_model.py -q -n 0 -p no:cacheprovider -k "$device" >"$log" 2>&1; then
    cat "$log" >&2
    echo "gpu.sh: the $device tests failed (output above)" >&2
    exit 1
fi
tests="$(tail -n 1 "$log" | grep -oE '[0-9]+ passed')"

figures="$("$python" bench/bench_gpu_step.py "$@")"
echo "$figures | tests: $tests ($device)"
