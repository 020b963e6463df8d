"""How a quantized weight keeps its codes and scales: frozen byte parameters FSDP2 can shard.

QLoRA under FSDP2 (``torch.distributed.fsdp.fully_shard``) should leave each of N ranks about 1/N
of the frozen 4-bit base. What ``fully_shard`` does with a unit's tensors (torch 2.13,
``torch/distributed/fsdp/_fully_shard``) decides the representation:

* **Buffers are never sharded.** ``_get_managed_states`` collects them only to move them to the
  mesh's device; every rank keeps all of them. Codes held as buffers are replicated.
* **Every parameter is sharded, frozen ones too.** Each parameter of a unit (``requires_grad`` or
  not) is chunked on dim 0 (padded to equal chunks, any shape but a scalar), all-gathered before
  the unit's forward and again before its backward, and freed after; a frozen one just gets no
  gradient and no reduce-scatter.
* **One unit may mix dtypes.** A unit's all-gather uses one flat buffer; when its inputs differ in
  dtype (``_get_all_gather_input_metadatas``) every input is viewed as uint8 and the bytes are
  gathered. So uint8 codes beside float32 adapters need nothing. (FSDP1's flat parameter needed
  one dtype per unit: the reason for bitsandbytes' ``bnb_4bit_quant_storage``, which stores the
  packed codes in the model's float dtype.)
* **Mixed precision casts floating parameters only.** ``MixedPrecisionPolicy(param_dtype=bf16)``
  casts every floating-point parameter for its all-gather and leaves the others
  (``FSDPParam.init_dtype_attrs``): a float32 absmax held as a parameter would arrive in
  bfloat16, and the weight would silently stop being bit-identical to bitsandbytes'.
* **Tensor subclasses can take over the all-gather** (``fsdp_pre_all_gather`` returns the inner
  tensors to gather, ``fsdp_post_all_gather`` rebuilds the whole from them). torchao's
  ``NF4Tensor`` works so: one parameter stands for the weight and implements the aten ops FSDP
  uses to chunk and copy it (split, new_zeros, view, copy_, ...), which requires each inner
  tensor to split evenly by the world size (no padding) and a 2-D weight.

The choice: a :class:`~lorakit.quant.QuantizedWeight` stays a small module, and the three tensors
that grow with the weight (packed codes, block absmax, nested absmax) are **frozen uint8
parameters holding their bytes**, shaped (values, bytes per value) so that a chunk on dim 0 never
splits a value; typed views give ``absmax`` and ``nested_absmax`` back in their own dtypes. The
codebooks (16 and 256 floats) stay buffers, replicated. Plain ``fully_shard`` then shards the
base with any sizes; uint8 is never cast by a mixed-precision policy (bitsandbytes' quant_storage
idea with the one storage dtype FSDP2 leaves alone); ``requires_grad_(True)`` on a code raises
instead of making it silently trainable; and no subclass has to follow every aten op FSDP calls.
The matmul (``quant/linear.py``) reads the module's tensors when it runs, so it sees the gathered
ones in forward and again in backward. State dicts are unchanged: the weight writes bitsandbytes'
layout itself, from the typed views.

Units: ``fully_shard`` each decoder block, then the root; a weight must sit in the unit of the
layer that calls it (a ``QuantizedWeight`` has no forward of its own, so it cannot be a unit).
"""

from __future__ import annotations

import torch
from torch import nn


def as_storage(tensor: torch.Tensor) -> nn.Parameter:
    """The bytes of ``tensor`` as a frozen uint8 parameter of shape (values, bytes per value).

    No copy when ``tensor`` is contiguous: the parameter shares its memory.
    """
    flat = tensor.detach().contiguous().reshape(-1)
    data = flat.view(torch.uint8).view(flat.numel(), flat.element_size())
    return nn.Parameter(data, requires_grad=False)


def typed(storage: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The values ``storage`` holds, as ``dtype`` in ``shape``: a view, never a copy."""
    return storage.view(dtype).view(shape)


def quantized_storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole) of the quantized weights' sharded storage.

    Counts the packed codes, absmax and nested absmax of every ``QuantizedWeight`` in ``model``
    (the codebooks, a few hundred floats per weight and replicated on every rank, are left out).
    Under FSDP2 a parameter is a ``DTensor``; what this process holds is the storage of its local
    shard, padding included, so with N ranks the first figure is about 1/N of the second. On an
    unsharded model both are the same. Use it to log what sharding saves.
    """
    from .weight import QuantizedWeight

    local = whole = 0
    for module in model.modules():
        if not isinstance(module, QuantizedWeight):
            continue
        for p in module.parameters(recurse=False):
            size = p.numel() * p.element_size()
            whole += size
            local += p.to_local().untyped_storage().nbytes() if hasattr(p, "to_local") else size
    return local, whole
