"""Whole models: quantize their linear layers, load bitsandbytes checkpoints, report errors.

``quantize(model)`` is QLoRA's first step (QLoRA paper, section 3): the frozen base's linear
weights become NF4 with double quantization; LoRA adapters are then applied on top as usual and
train in higher precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import QuantError, gather
from .blockwise import check_blocksize
from .codebooks import FOUR_BIT, check_quant_type
from .linear import QuantLinear
from .weight import QuantizedWeight

_STATE_MARK = ".weight.quant_state."


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the output head module(s): ``get_output_embeddings()``, else modules named lm_head."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is not None:
        return {id(head)}
    return {id(m) for p, m in model.named_modules() if p.rsplit(".", 1)[-1] == "lm_head"}


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a subclass (transformers' FalconLinear, ...), whose forward is taken to be
    ``x Wᵀ + b``; not ``nn.MultiheadAttention``'s out_proj, whose weight its owner reads itself."""
    return isinstance(module, nn.Linear) and not isinstance(
        module, nn.modules.linear.NonDynamicallyQuantizableLinear
    )


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module, paths: list[str]) -> None:
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if parent._modules.get(child) is old:
            parent._modules[child] = new


def quantize(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    double_quant: bool = True,
    blocksize: int = 64,
    skip: Iterable[str] = (),
    compute_dtype: torch.dtype | None = None,
    include_head: bool = False,
) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by frozen :class:`QuantLinear` layers.

    Subclasses of ``nn.Linear`` count (their forward is taken to be ``x Wᵀ + b``, as for
    transformers' FalconLinear); ``nn.MultiheadAttention``'s out_proj does not (its owner reads
    the weight directly).

    ``quant_type`` is "nf4" (QLoRA's default), "fp4" or "int8"; ``blocksize`` one of 32..4096;
    ``double_quant`` quantizes the block scales again (about 4.127 bits per weight for NF4 at
    block 64). ``compute_dtype`` is the matmul dtype (default: each weight's own dtype).

    Left in full precision: the output head (unless ``include_head``; a head tied to the input
    embeddings always stays), modules named in ``skip`` (a name matches a module path equal to
    it or ending in ``"." + name``), and a linear layer whose weight is shared with another
    module. Quantize the base model before ``apply_lora``; the model is changed in place and
    returned.

    A model loaded from a memory-mapped checkpoint (transformers maps safetensors files) has
    tensors that point into the mapping, which lives as long as any of them does. The tensors
    kept in full precision (embeddings, norms, biases, the head) are therefore copied into
    ordinary memory first, so that the mapping, with every page quantization read, is released
    once the quantized weights' originals go.
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    skip = [skip] if isinstance(skip, str) else list(skip)
    paths: dict[int, list[str]] = {}  # module id -> every path it sits at
    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it
    linears: dict[int, nn.Linear] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(id(module))
        if _is_linear(module):
            linears[id(module)] = module
    every_path = [p for ps in paths.values() for p in ps]
    problems = [
        f"skip entry {s!r} matches no module"
        for s in skip
        if not any(_named(p, s) for p in every_path)
    ]
    heads = set() if include_head else _output_heads(model)
    chosen = [
        key
        for key, linear in linears.items()
        if key not in heads
        and owners[id(linear.weight)] == {key}  # a weight tied elsewhere stays (and stays tied)
        and not any(_named(p, s) for p in paths[key] for s in skip)
    ]
    if not chosen and not problems:
        problems.append("found no nn.Linear layer to quantize (the output head is left alone)")
    gather(problems, QuantError, f"cannot quantize {type(model).__name__}")
    _copy_out_of_mapped_memory(model, {id(linears[key].weight) for key in chosen})
    for key in chosen:
        linear = linears.pop(key)  # held nowhere else once replaced: its float weight goes now
        new = QuantLinear.from_linear(
            linear,
            quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        if paths[key] == [""]:
            return new
        _replace_everywhere(model, linear, new, paths[key])
        del linear
    return model


def _copy_out_of_mapped_memory(model: nn.Module, replaced: set[int]) -> None:
    """Copy the CPU tensors of ``model`` held in memory torch did not allocate (a memory-mapped
    file, a foreign buffer) into memory of their own, except those in ``replaced``.

    Each tensor keeps its identity (``.data`` is swapped), so tied weights stay tied and
    references held elsewhere (an optimizer, another module) follow.
    """
    done: set[int] = set(replaced)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for tensor in table.values():
                if tensor is None or id(tensor) in done or tensor.device.type != "cpu":
                    continue
                done.add(id(tensor))
                if not tensor.untyped_storage().resizable():  # not from torch's allocator
                    with torch.no_grad():
                        tensor.data = tensor.data.clone()


def _named(path: str, name: str) -> bool:
    """Whether ``name`` names the module at ``path``: the path itself or its last parts."""
    return path == name or path.endswith("." + name)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantLinear` by a plain ``nn.Linear`` with the dequantized weight."""
    if isinstance(model, QuantLinear):
        return model.dequantized()
    for path, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            _replace_everywhere(model, module, module.dequantized(), [path])
    return model


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantizedWeight]]:
    """(path, weight) for every quantized weight in the model (path ends in ``.weight``)."""
    for path, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            yield path, module


def hf_quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` transformers needs to load this model's 4-bit checkpoint.

    Put it in ``config.json`` beside a state dict of the quantized model (``model.config.
    quantization_config = ...`` before ``save_pretrained``) and ``from_pretrained`` rebuilds the
    model with bitsandbytes' ``Linear4bit`` layers. Every quantized weight must share one
    4-bit format; linear layers left in full precision are listed as skipped modules.
    """
    weights = [w for _, w in quantized_weights(model)]
    formats = {(w.quant_type, w.double_quant, w.compute_dtype) for w in weights}
    if len(formats) != 1 or weights[0].quant_type not in FOUR_BIT:
        found = ", ".join(sorted(f"{t}{' + double quant' if d else ''}" for t, d, _ in formats))
        raise QuantError(
            f"transformers loads one 4-bit format (nf4 or fp4) per model; found {found or 'none'}"
        )
    quant_type, double_quant, compute_dtype = formats.pop()
    skipped = sorted(p for p, m in model.named_modules() if _is_linear(m))
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skipped or None,
    }


@dataclasses.dataclass(frozen=True)
class RequantError:
    """What quantizing a merged weight again cost, in the merged weight's own terms.

    ``relative``: ‖Q(M) − M‖ / ‖M‖ for the merged weight M (Frobenius norms);
    ``max_abs``: the largest |Q(M) − M|;
    ``of_delta``: ‖Q(M) − M‖ / ‖ΔW‖, the error against the size of the adapter's update (above
    1, the rounding is larger than what the adapter changed).
    """

    relative: float
    max_abs: float
    of_delta: float

    def __str__(self) -> str:
        return (
            f"relative {self.relative:.4g}, max {self.max_abs:.3g}, "
            f"{self.of_delta:.3g}x the adapter's update"
        )


def requantize(merged: torch.Tensor, like: QuantizedWeight) -> tuple[QuantizedWeight, RequantError]:
    """Quantize a merged weight in ``like``'s format; the result and the error it introduced.

    ``like`` is the quantized base the merge started from: the update is measured against its
    dequantized values. The new weight records the error as ``requant_error``.
    """
    with torch.no_grad():
        exact = merged.detach().float()
        new = QuantizedWeight.quantize(
            merged,
            like.quant_type,
            blocksize=like.blocksize,
            double_quant=like.double_quant,
            compute_dtype=like.compute_dtype,
        )
        diff = new.dequantize(torch.float32) - exact
        delta = exact - like.dequantize(torch.float32)
        norm, delta_norm = float(exact.norm()), float(delta.norm())
        error = RequantError(
            relative=float(diff.norm()) / norm if norm else 0.0,
            max_abs=float(diff.abs().max()),
            of_delta=float(diff.norm()) / delta_norm if delta_norm else float("inf"),
        )
    new.requant_error = error
    return new, error


def requantization_errors(model: nn.Module) -> dict[str, RequantError]:
    """The error each re-quantized weight carries (``merge_and_unload(..., requantize=True)``)."""
    return {
        path: w.requant_error
        for path, w in quantized_weights(model)
        if getattr(w, "requant_error", None) is not None
    }
