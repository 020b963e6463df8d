"""What adapters take in a server's memory: their tensors as attached (:func:`file_bytes`, from a
file's shapes before it is attached) and the layers' stacks of all adapters that mixed batches of
many adapters use (:func:`stack_projection`, the most they can take, and :func:`stack_bytes`, what
they take now). The store's byte budget (``--max-lora-memory``) counts both."""

from __future__ import annotations

import math

from ..adapter_memory import adapter_dtype_on
from ..layers import LoraLayer


def adapter_itemsize(model) -> int:
    """Bytes of one adapter value on ``model``: the adapters' dtype on this base (float32 on a
    half-precision or quantized one)."""
    return adapter_dtype_on(model.get_input_embeddings().weight, None).itemsize


def file_bytes(model, file) -> int:
    """Bytes an adapter file's tensors take once attached to ``model``, ``numel · itemsize``
    each (:func:`adapter_itemsize`)."""
    return sum(math.prod(shape) for shape in file.shapes.values()) * adapter_itemsize(model)


_STACKED_KEYS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def stack_shapes(file, itemsize: int) -> dict[str, tuple[int, int, bool]]:
    """Each module of an adapter file: (rank, bytes of A and B per unit of rank, whether its
    layer stacks in any mixed batch: embeddings and convolutions), from the tensors' shapes."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in file.shapes.items():
        for tag in _STACKED_KEYS:
            if key.endswith(tag):
                parts.setdefault(key[: -len(tag)], {})[tag] = tuple(shape)
    out = {}
    for module, found in parts.items():
        embedding = ".lora_embedding_A" in found
        a = found.get(".lora_embedding_A" if embedding else ".lora_A.weight")
        b = found.get(".lora_embedding_B" if embedding else ".lora_B.weight")
        if not a or not b or a[0] == 0:
            continue
        per_rank = (math.prod(a) + math.prod(b)) // a[0] * itemsize
        out[module] = (a[0], per_rank, embedding or len(a) > 2)
    return out


def stack_projection(entries) -> int:
    """The most bytes the layers' stacks of ``entries`` (the adapters in memory together) can
    take: per module, (n + 1) slots of its largest rank; linear layers only past
    ``LoraLayer.GROUPED_MAX_ADAPTERS`` adapters (fewer are added from their parameters)."""
    n = len(entries)
    grouped_max = LoraLayer.GROUPED_MAX_ADAPTERS
    modules: dict[str, list] = {}
    for entry in entries:
        for module, (rank, per_rank, always) in entry.stacked.items():
            found = modules.setdefault(module, [0, per_rank, always])
            found[0] = max(found[0], rank)
    return sum(
        (n + 1) * rank * per_rank
        for rank, per_rank, always in modules.values()
        if always or n > grouped_max
    )


def stack_bytes(layers) -> int:
    """Bytes of the stacked copies of all adapters that LoRA ``layers`` keep for mixed batches
    of many adapters (``MixedRows.stacked``: A (n + 1, R, in) and B (n + 1, out, R) a layer)."""
    total = 0
    for layer in layers:
        cached = layer._stack_cache
        if cached is not None:
            total += sum(t.numel() * t.element_size() for t in cached[1])
    return total
