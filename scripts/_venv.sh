# Shared by scripts/test.sh and scripts/demo.sh; source it, do not run it.
#
# ensure_venv DIR REQUIREMENTS
#   Creates the virtual environment DIR (if missing or broken), installs torch first on its own,
#   then REQUIREMENTS, then requirements/no-deps.txt with --no-deps, then this package in editable
#   mode. A hash of every input is stored in DIR; when it matches, pip is skipped entirely.

pick_python() {
    if [[ -n "${LORAKIT_PYTHON:-}" ]]; then
        echo "$LORAKIT_PYTHON"
    elif command -v python3.11 >/dev/null 2>&1; then
        echo python3.11
    else
        echo python3
    fi
}

_inputs_hash() {
    local python="$1" req="$2"
    {
        "$python" -c 'import sys; print(sys.version)'
        cat "$req" requirements/no-deps.txt pyproject.toml scripts/_venv.sh
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local venv="$1" req="$2"
    local python stamp want
    python="$(pick_python)"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: lorakit needs Python >= 3.10; '$python' is missing or older" >&2
        return 1
    fi

    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        echo ">> creating $venv with $python"
        rm -rf "$venv"
        "$python" -m venv "$venv"
    fi

    stamp="$venv/.lorakit-inputs.sha256"
    want="$(_inputs_hash "$venv/bin/python" "$req")"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi

    local pip=("$venv/bin/python" -m pip install --quiet)
    local torch_pin
    torch_pin="$(grep -E '^torch==' "$req")"
    echo ">> installing $torch_pin"
    "${pip[@]}" "$torch_pin"
    echo ">> installing $req"
    # llama-cpp-python (test requirements) is built from source: for any x86-64 CPU with AVX2,
    # not for this one's own instructions (a native build on a CPU with AMX crashed on q8_0)
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" -r "$req"
    echo ">> installing requirements/no-deps.txt (--no-deps)"
    "${pip[@]}" --no-deps -r requirements/no-deps.txt
    echo ">> installing lorakit (editable)"
    "${pip[@]}" --no-deps -e .
    echo "$want" >"$stamp"
}
