#!/usr/bin/env bash
# The demo in its own environment (.venv-demo). Extra arguments go to the demo script.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

ensure_venv .venv-demo requirements/demo.txt

demo=examples/quickstart.py
if [[ ! -f "$demo" ]]; then
    echo "error: $demo not found" >&2
    exit 1
fi
echo ">> python $demo $*"
exec .venv-demo/bin/python "$demo" "$@"
