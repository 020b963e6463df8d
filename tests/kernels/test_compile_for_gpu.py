"""The kernels compile for an H100/H200 (sm_90) ahead of time, on any machine: Triton's compiler
and the ptxas it ships run without a GPU. This catches what the interpreter accepts but the
compiler does not, and shows in the PTX that 4-bit decoding keeps its two roundings (no FMA), the
condition of its bit-identity with the eager path and bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (the kernels extra)")

SCRIPT = Path(__file__).with_name("compile_sm90.py")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, said (else it warns)
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode:
        pytest.fail(f"compiling for sm_90 failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_to_an_sm90_binary(compiled):
    expected = {"gemm nf4 base bf16", "gemm low-rank add fp32", "dequantize"}
    expected |= {f"gemm nf4 by rows {way}" for way in ("forward", "backward")}
    expected |= {f"{k} {d}" for k in ("shrink", "expand") for d in ("bf16", "fp32")}
    assert expected <= set(compiled)
    assert all(entry["cubin_bytes"] > 0 for entry in compiled.values())


def test_4bit_decoding_compiles_without_fused_multiply_adds(compiled):
    # the check can see one: left to itself Triton contracts code · scale + offset into an FMA
    assert compiled["dequantize with fp fusion"]["ptx_fma"]
    assert not compiled["dequantize"]["ptx_fma"] and compiled["dequantize"]["ptx_mul"]
    for name in ("gemm nf4 base bf16", "gemm nf4 by rows forward", "gemm nf4 by rows backward"):
        assert not compiled[name]["ptx_fma"], name  # decoded tiles: the same two roundings
