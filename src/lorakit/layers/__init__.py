"""LoRA layers, one module per base-layer kind; the adapter math lives here and nowhere else."""

from __future__ import annotations

from torch import nn

from ..quant import QuantLinear
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .linear import LoraConv1D, LoraLinear
from .saved import SavedModule

__all__ = [
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "SavedModule",
    "is_gpt2_conv1d",
    "kind_of",
    "shape_of",
    "wrap",
]

ADAPTABLE = "nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d (groups=1)"


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    cls = type(module)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers")
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    )


def kind_of(module: nn.Module) -> tuple[str | None, str]:
    """(kind, reason): the LoRA kind for a base module, or None and why it cannot be adapted."""
    if isinstance(module, LoraLayer):
        return module.kind, ""
    if isinstance(module, QuantLinear):  # a quantized base (lorakit.quant): LoRA as on nn.Linear
        return LoraLinear.kind, ""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None, "it is the out_proj of nn.MultiheadAttention, which bypasses its forward"
    if isinstance(module, nn.Linear):
        return LoraLinear.kind, ""
    if is_gpt2_conv1d(module):
        return LoraConv1D.kind, ""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding.kind, ""
    if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(
        module, nn.modules.conv._ConvTransposeNd
    ):
        if module.groups != 1:
            return None, f"grouped convolutions (groups={module.groups}) are not supported"
        return LoraConv.kind, ""
    return None, f"{type(module).__name__} is not a layer kind lorakit adapts ({ADAPTABLE})"


def shape_of(module: nn.Module, kind: str) -> tuple[int, int, str]:
    """(in, out, shape text) of a base module of a given kind; works on the meta device."""
    w = module.weight
    if kind == "linear":
        return w.shape[1], w.shape[0], f"{w.shape[1]}->{w.shape[0]}"
    if kind == "conv1d_gpt2":
        return w.shape[0], w.shape[1], f"{w.shape[0]}->{w.shape[1]}"
    if kind == "embedding":
        return w.shape[0], w.shape[1], f"{w.shape[0]}x{w.shape[1]}"
    kernel = "x".join(str(k) for k in w.shape[2:])
    return w.shape[1], w.shape[0], f"{w.shape[1]}->{w.shape[0]} k{kernel}"


def adapter_params(kind: str, in_f: int, out_f: int, r: int, module: nn.Module, slices) -> int:
    """Parameters one adapter of rank r adds to a module of this kind."""
    if kind == "conv":
        kernel = 1
        for k in module.weight.shape[2:]:
            kernel *= k
        return r * in_f * kernel + out_f * r
    if slices:
        m = sum(slices)
        return m * r * in_f + m * (out_f // len(slices)) * r
    return r * (in_f + out_f)


def wrap(module: nn.Module, kind: str, slices=None) -> LoraLayer:
    """A new LoRA layer of the given kind around ``module`` (which gives up its tensors to it)."""
    if kind == "linear":
        return LoraLinear(module, slices)
    if kind == "conv1d_gpt2":
        return LoraConv1D(module, slices)
    if kind == "embedding":
        return LoraEmbedding(module)
    return LoraConv(module)
