#!/usr/bin/env bash
# Lint, format check and tests in their own environment (.venv-test).
# Extra arguments go to pytest:  bash scripts/test.sh -k config -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_venv.sh

ensure_venv .venv-test requirements/test.txt
bin=.venv-test/bin

failed=()
echo ">> ruff check ."
"$bin/ruff" check . || failed+=("ruff check")
echo ">> ruff format --check ."
"$bin/ruff" format --check . || failed+=("ruff format --check")

echo ">> python -m pytest $*"
pytest_status=0
"$bin/python" -m pytest "$@" || pytest_status=$?
if ((pytest_status != 0)); then
    failed+=("pytest (exit $pytest_status)")
fi

if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    # pytest's own status (e.g. 5: no tests collected) is kept; lint failures alone give 1.
    exit $((pytest_status != 0 ? pytest_status : 1))
fi
echo ">> all checks passed"
