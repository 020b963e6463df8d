#!/usr/bin/env bash
# The test suite (the slow real-model tests left out) on another CPU code path than this machine's
# own: torch's vector kernels one step narrower (AVX-512 -> AVX2, AVX2 -> the generic ones) and
# MKL's GEMM limited to SSE4.2. Sums come out in another order there, as they do on a CPU with
# other instructions; a test that compares results of different shapes or code paths bit for bit
# fails here. Run scripts/test.sh first (it builds .venv-test). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=.venv-test/bin/python
if [[ ! -x "$python" ]]; then
    echo "error: $python not found; run 'bash scripts/test.sh' first" >&2
    exit 1
fi

native="$("$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
case "$native" in
AVX512) other=avx2 ;;
*) other=default ;;
esac
export ATEN_CPU_CAPABILITY="$other" MKL_ENABLE_INSTRUCTIONS=SSE4_2
echo ">> python -m pytest -m 'not slow' $* (ATEN_CPU_CAPABILITY=$other, this CPU: $native; MKL_ENABLE_INSTRUCTIONS=SSE4_2)"
# Check the override took: torch ignores an unknown or unsupported capability silently.
"$python" -c "import torch, sys; c = torch.backends.cpu.get_cpu_capability(); print('torch kernels:', c); sys.exit(c == '$native')"
exec "$python" -m pytest -q -m "not slow" "$@"
