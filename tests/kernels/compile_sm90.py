"""Compile every kernel for sm_90 (H100/H200) without a GPU and print what came out, as JSON.

Run as a script in a process without ``TRITON_INTERPRET`` (under the interpreter the kernels are
not compilable objects); ``test_compile_for_gpu.py`` runs it and checks the result.
"""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorakit.kernels import gemm, mixed, nf4

SM90 = GPUTarget("cuda", 90, 32)
SEGMENTS = dict(
    order_ptr="*i32", starts_ptr="*i32", counts_ptr="*i32", offsets_ptr="*i32", ranks_ptr="*i32"
)
GEMM = dict(
    BLOCKSIZE=64, DOUBLE=True, HAS_OFFSET=True, HAS_BASE=True, QUANT=False, HAS_LORA=True,
    HAS_BIAS=True, HAS_ACC=False, DOT_F32=False, IEEE=False, BY_ROWS=False, W_TRANS=True,
    BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16,
)  # fmt: skip
DEQUANT = dict(
    out_ptr="*bf16", n="i64", packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8",
    nested_ptr="*fp32", nested_code_ptr="*fp32", offset="fp32",
)  # fmt: skip


def compiled(kernel, types: dict, consts: dict, fusion: bool = True):
    sig, constexprs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            sig[name] = types[name]
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    options = {"enable_fp_fusion": fusion}
    if kernel is gemm._gemm_kernel:  # the warps gemm() launches it with
        options["num_warps"] = gemm.warps(consts["BLOCK_M"], consts["BLOCK_N"])
    return triton.compile(source, target=SM90, options=options).asm


def gemm_types(dtype: str) -> dict:
    p = f"*{dtype}"
    four_bit = dict(packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", nested_ptr="*fp32")
    return dict(
        x_ptr=p, w_ptr=p, **four_bit, nested_code_ptr="*fp32", offset="fp32", l_ptr=p, r_ptr=p,
        bias_ptr=p, acc_ptr=p, out_ptr=p, M="i32", N="i32", K="i32", R="i32", scale="fp32",
        stride_wk="i32", stride_wn="i32", stride_rr="i32", stride_rn="i32",
    )  # fmt: skip


def main() -> dict:
    out = {}
    nf4_base = {**GEMM, "QUANT": True}
    low_rank_add = {**GEMM, "IEEE": True, "HAS_BASE": False, "HAS_BIAS": False, "HAS_ACC": True}
    out["gemm nf4 base bf16"] = compiled(gemm._gemm_kernel, gemm_types("bf16"), nf4_base, False)
    for trans in (True, False):  # tiles decoded row by row, forward (x Wᵀ) and backward (dy W)
        by_rows = {**nf4_base, "BY_ROWS": True, "W_TRANS": trans}
        name = f"gemm nf4 by rows {'forward' if trans else 'backward'}"
        out[name] = compiled(gemm._gemm_kernel, gemm_types("bf16"), by_rows, False)
    out["gemm low-rank add fp32"] = compiled(gemm._gemm_kernel, gemm_types("fp32"), low_rank_add)
    for dtype in ("bf16", "fp32"):
        p, ieee = f"*{dtype}", dtype == "fp32"
        out[f"shrink {dtype}"] = compiled(
            mixed._shrink_kernel,
            dict(x_ptr=p, w_ptr=p, out_ptr="*fp32", K="i32", R_OUT="i32", **SEGMENTS),
            dict(DOT_F32=False, IEEE=ieee, BLOCK_T=16, BLOCK_R=16, BLOCK_K=64),
        )
        out[f"expand {dtype}"] = compiled(
            mixed._expand_kernel,
            dict(xa_ptr="*fp32", w_ptr=p, y_ptr=p, scales_ptr="*fp32", N="i32", R_IN="i32",
                 **SEGMENTS),
            dict(DOT_F32=False, IEEE=ieee, BLOCK_T=16, BLOCK_R=64, BLOCK_N=64),
        )  # fmt: skip
    consts = dict(BLOCKSIZE=64, DOUBLE=True, HAS_OFFSET=True, BLOCK=1024)
    out["dequantize"] = compiled(nf4._dequantize_kernel, DEQUANT, consts, fusion=False)
    out["dequantize with fp fusion"] = compiled(nf4._dequantize_kernel, DEQUANT, consts)
    return {
        name: {"cubin_bytes": len(asm["cubin"]), "ptx_fma": "fma.rn.f32" in asm["ptx"],
               "ptx_mul": "mul.rn.f32" in asm["ptx"]}
        for name, asm in out.items()
    }  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(main()))
