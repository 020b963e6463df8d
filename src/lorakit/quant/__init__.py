"""Quantized base weights for QLoRA: NF4/FP4/int8 codebooks, blockwise and double quantization.

A frozen base weight is stored as 4-bit codes with per-block scales (QLoRA, Dettmers et al. 2023)
in a :class:`QuantizedWeight`; a :class:`QuantLinear` (or a LoRA layer on top of one) computes
with it through :func:`quantized_linear`, which dequantizes on the fly and never keeps a dense
copy between forward and backward. Codes, scales and checkpoints are bit-compatible with
bitsandbytes' 4-bit format; everything runs in plain PyTorch, on any device, and nothing here
imports bitsandbytes.

    model = lorakit.quantize(model, "nf4", double_quant=True)   # QLoRA's base
    model = lorakit.apply_lora(model, LoraConfig(r=16, target_modules="all-linear"))

Under FSDP2 the codes and scales are frozen parameters, so ``fully_shard`` on each decoder block
and then the root shards them like any weight (:mod:`lorakit.quant.storage` says why and how).
"""

from .blockwise import BLOCKSIZES, NESTED_BLOCKSIZE
from .checkpoint import load_quantized
from .codebooks import NF4, QUANT_TYPES, codebook
from .convert import (
    RequantError,
    dequantize,
    hf_quantization_config,
    quantize,
    quantized_weights,
    requantization_errors,
    requantize,
)
from .linear import QuantLinear, quantized_linear
from .storage import quantized_storage_bytes
from .weight import QuantizedWeight

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4",
    "QUANT_TYPES",
    "QuantLinear",
    "QuantizedWeight",
    "RequantError",
    "codebook",
    "dequantize",
    "hf_quantization_config",
    "load_quantized",
    "quantize",
    "quantized_linear",
    "quantized_storage_bytes",
    "quantized_weights",
    "requantization_errors",
    "requantize",
]
