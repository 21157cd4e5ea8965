#!/usr/bin/env bash
# Memory safety of the Triton block-sparse kernels on a GPU: compute-sanitizer (memcheck) over benchmarks/sanitize.py,
# which launches the pointer and the TMA variant on odd shapes (L = 1, 257, 4133; D = 64, 80, 128; kv_length; empty
# rows) and checks every result against the torch reference.
#
#   benchmarks/sanitize.sh [LOG]                # memcheck; the full log goes to LOG (default: a temporary file)
#   TOOL=initcheck benchmarks/sanitize.sh       # another compute-sanitizer tool (initcheck, racecheck, synccheck)
#   benchmarks/sanitize.sh --self-test [LOG]    # plants an out-of-bounds read: passes only if memcheck reports it
#
# Prints one verdict line last ("SANITIZE PASS: ..." / "SANITIZE FAIL: ..."); exit status 0 only on a clean run.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self_test=0
if [ "${1:-}" = "--self-test" ]; then self_test=1; shift; fi
log=${1:-$(mktemp -t sanitize.XXXXXX.log)}
tool=${TOOL:-memcheck}
python=${PYTHON:-python3}

sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /opt/cuda/bin/compute-sanitizer; do
    [ -z "$sanitizer" ] && [ -x "$candidate" ] && sanitizer=$candidate
done
if [ -z "$sanitizer" ]; then
    echo "SANITIZE FAIL: compute-sanitizer not found (install the CUDA toolkit, or put it on PATH)"
    exit 2
fi

# Every tensor gets its own cudaMalloc, so a read past one tensor's end leaves its allocation (memcheck sees it);
# the real kernels, not Triton's CPU interpreter.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
workload=("$python" "$here/sanitize.py")
[ "$self_test" = 1 ] && workload+=(--plant-oob)

start=$(date +%s)
"$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 50 "${workload[@]}" >"$log" 2>&1
rc=$?
seconds=$(( $(date +%s) - start ))
tail -n 40 "$log"
summary=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$log" | tail -n 1)
errors=$(echo "$summary" | grep -oE "[0-9]+" || true)
workload_line=$(grep -E "^WORKLOAD (OK|FAIL|PLANTED)" "$log" | tail -n 1)

if [ "$self_test" = 1 ]; then
    if [ "$rc" != 0 ] && { [ "${errors:-0}" -gt 0 ] || grep -q "Invalid __global__ read\|illegal memory access" "$log"; }; then
        echo "SANITIZE PASS: self-test: $tool reported the planted out-of-bounds read (${summary:-error exit $rc}; ${seconds}s; log $log)"
        exit 0
    fi
    echo "SANITIZE FAIL: self-test: the planted out-of-bounds read went unreported (exit $rc, ${summary:-no summary}; log $log)"
    exit 1
fi
if [ "$rc" = 0 ] && [ "${errors:-0}" = 0 ] && [[ "$workload_line" == "WORKLOAD OK"* ]]; then
    echo "SANITIZE PASS: $tool clean, ${summary:-ERROR SUMMARY: 0 errors}; ${workload_line#WORKLOAD OK: }; ${seconds}s; log $log"
    exit 0
fi
echo "SANITIZE FAIL: $tool exit $rc, ${summary:-no error summary}, workload: ${workload_line:-did not finish}; ${seconds}s; log $log"
exit 1
