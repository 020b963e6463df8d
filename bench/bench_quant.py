"""QLoRA's quantized base: lorakit's NF4 against bitsandbytes and torchao's NF4, side by side.

One 4096 x 4096 float32 weight (Gaussian), NF4 with double quantization at block 64, each
library's own functions: ``QuantizedWeight.quantize`` / ``.dequantize``,
``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` and torchao's ``to_nf4`` /
``get_original_weight``. Each round times every library once, in turn (the order rotating);
figures are medians over rounds, ratios medians of same-round ratios.

The forward rows run a linear layer on 8 x 128 tokens without autograd. bitsandbytes'
``Linear4bit`` is measured on its float32 path: in eval mode on a CPU with AVX512-BF16 it would
otherwise switch to a bfloat16 kernel and compute something else.

Memory: the bytes held by the quantized linear layers of a SmolLM2-135M-shaped Llama (every
linear layer but the output head, which is tied to the embeddings) against the float32 bytes of
the same layers, and the whole model's parameters and buffers before and after.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

import _common as C

NAME = "quant"
TITLE = "QLoRA base: NF4 + double quantization against bitsandbytes and torchao (4096 x 4096)"
ANCHOR_PACKAGES = ["bitsandbytes", "torchao", "transformers"]
SIZE = 4096
TOKENS = (8, 128)
ROUNDS = {"quantize": 5, "dequantize": 9, "forward": 7}
MIB = 2**20


def _torchao_nf4():
    try:  # torchao >= 0.13 moved the NF4 tensor here
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
    return to_nf4, linear_nf4


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _model_bytes(model: nn.Module) -> int:
    return _tensor_bytes([*model.parameters(), *model.buffers()])


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _versus(figure, times, ours, theirs, anchor_name, goal="", unit="ms"):
    med = _medians(times)
    ratio = C.median_ratio(times, ours, theirs)
    return C.row(figure, med[ours], med[theirs], anchor_name, ratio, goal, unit)


def run(threads: int) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    import lorakit
    from lorakit.quant import QuantizedWeight, QuantLinear, quantized_weights

    to_nf4, linear_nf4 = _torchao_nf4()
    torch.manual_seed(0)
    w = torch.randn(SIZE, SIZE)
    rows = []

    def lorakit_quantize():
        return QuantizedWeight.quantize(w, "nf4", blocksize=64, double_quant=True)

    def bnb_quantize():
        return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def torchao_quantize():
        return to_nf4(w, block_size=64, scaler_block_size=256)

    ours, (packed, state), theirs = lorakit_quantize(), bnb_quantize(), torchao_quantize()

    def error(dense):
        return float((dense.float() - w).norm() / w.norm())

    err = {
        "lorakit": error(ours.dequantize()),
        "bnb": error(F.dequantize_4bit(packed, state)),
        "torchao": error(theirs.get_original_weight()),
    }
    same_codes = torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    rows.append(
        C.row(
            "relative Frobenius error (codes and scales identical: "
            f"{'yes' if same_codes else 'NO'})",
            err["lorakit"],
            err["bnb"],
            "bitsandbytes",
            None,
            "== 1x",
        )
    )
    rows.append(C.row("relative Frobenius error", err["lorakit"], err["torchao"], "torchao"))

    times = C.interleaved(
        {"lorakit": lorakit_quantize, "bnb": bnb_quantize, "torchao": torchao_quantize},
        ROUNDS["quantize"],
    )
    label = f"quantize, median of {ROUNDS['quantize']}"
    rows.append(_versus(label, times, "lorakit", "bnb", "bitsandbytes", "<= 1.0x"))
    rows.append(_versus(label, times, "lorakit", "torchao", "torchao"))

    times = C.interleaved(
        {
            "lorakit": ours.dequantize,
            "bnb": lambda: F.dequantize_4bit(packed, state),
            "torchao": theirs.get_original_weight,
        },
        ROUNDS["dequantize"],
    )
    label = f"dequantize to float32, median of {ROUNDS['dequantize']}"
    rows.append(_versus(label, times, "lorakit", "bnb", "bitsandbytes", "<= 2x"))
    rows.append(_versus(label, times, "lorakit", "torchao", "torchao"))

    linear = nn.Linear(SIZE, SIZE, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    quantized = QuantLinear.from_linear(linear)
    bnb_linear = bnb.nn.Linear4bit(SIZE, SIZE, bias=False, compute_dtype=torch.float32)
    bnb_linear.load_state_dict(linear.state_dict())
    bnb_linear = bnb_linear.to("cpu").eval()
    bnb_linear.support_avx512bf16_for_cpu = False  # its float32 path, as lorakit's
    x = torch.randn(*TOKENS, SIZE)
    with torch.no_grad():
        times = C.interleaved(
            {
                "float32": lambda: linear(x),
                "lorakit": lambda: quantized(x),
                "bnb": lambda: bnb_linear(x),
                "torchao": lambda: linear_nf4(x, theirs),
            },
            ROUNDS["forward"],
        )
    tokens = "x".join(map(str, TOKENS))
    label = f"forward, {tokens} tokens, median of {ROUNDS['forward']}"
    rows.append(
        _versus(f"{label}: lorakit", times, "lorakit", "float32", "float32 nn.Linear", "<= 1.3x")
    )
    rows.append(
        _versus(f"{label}: bitsandbytes Linear4bit", times, "bnb", "float32", "float32 nn.Linear")
    )
    rows.append(
        _versus(f"{label}: torchao linear_nf4", times, "torchao", "float32", "float32 nn.Linear")
    )

    model = C.smollm2_shaped()
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    float_bytes = _tensor_bytes([p for m in linears for p in m.parameters()])
    before = _model_bytes(model)
    lorakit.quantize(model, "nf4", double_quant=True, blocksize=64)
    quant_bytes = sum(w.nbytes for _, w in quantized_weights(model))
    after = _model_bytes(model)
    rows.append(
        C.row(
            f"SmolLM2-135M: its {len(linears)} quantized linear layers, resident",
            quant_bytes / MIB,
            float_bytes / MIB,
            "the same layers in float32",
            None,
            "<= 0.135x",
            "MiB",
        )
    )
    rows.append(
        C.row(
            "SmolLM2-135M: whole model (parameters and buffers), after vs before",
            after / MIB,
            before / MIB,
            "float32 model",
            None,
            "",
            "MiB",
        )
    )
    return rows
