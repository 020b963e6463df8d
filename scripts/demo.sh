#!/usr/bin/env bash
# The demo in its own environment (.venv-demo): LoRA fine-tuning of the embedded SmolLM2-135M-Instruct
# on the date-normalisation task (examples/date_demo.yaml). Extra arguments are config overrides,
# e.g.  bash scripts/demo.sh training.method=qlora output.dir=runs/date_qlora
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

ensure_venv .venv-demo requirements/demo.txt

demo=examples/date_demo.py
if [[ ! -f "$demo" ]]; then
    echo "error: $demo not found" >&2
    exit 1
fi
echo ">> python $demo $*"
exec .venv-demo/bin/python "$demo" "$@"
