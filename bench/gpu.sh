#!/usr/bin/env bash
# The GPU figures in one go, on a machine with a CUDA device (at most about 8 minutes):
#   1. the device tests compiled on the GPU: tests/test_devices.py and tests/kernels (the same
#      kernel tests the CPU runs in Triton's interpreter);
#   2. bench/run.py gpu: every GPU figure side by side with PEFT and bitsandbytes, written to the
#      gpu section of BENCHMARKS.md (bench/bench_gpu.py says what is measured).
# Without a CUDA device it prints that it skipped and exits 0, leaving BENCHMARKS.md as it is.
#
#   bash bench/gpu.sh                 # PYTHON=path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv-test/bin/python}"
[ -x "$PY" ] || PY=python

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: skipped: no CUDA device (torch.cuda.is_available() is False);"
    echo "BENCHMARKS.md's gpu section keeps 'not measured: no GPU available'"
    exit 0
fi
"$PY" -c 'import torch, triton; print("device:", torch.cuda.get_device_name(0),
    "| torch", torch.__version__, "| triton", triton.__version__)' || exit 1

unset TRITON_INTERPRET  # the kernels compiled for the device, not interpreted
tests=0
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py tests/kernels || tests=$?
[ "$tests" -eq 0 ] || echo "bench/gpu.sh: device tests FAILED (exit $tests); the figures still run"

timeout 270 "$PY" bench/run.py gpu
bench=$?
[ "$bench" -eq 0 ] || echo "bench/gpu.sh: bench/run.py gpu FAILED or timed out (exit $bench)"
exit $(( tests != 0 ? tests : bench ))
