"""LoRA layers, one module per base-layer kind; the adapter math lives here and nowhere else.

A kind is a ``LoraLayer`` subclass registered in ``kinds.py`` (``@register``); importing this
package registers the built-in ones (linear, GPT-2 Conv1D, embedding, convolution), which accept
disjoint sets of base modules.
"""

from __future__ import annotations

from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .kinds import KINDS, adapter_params, kind_class, kind_of, register, shape_of, wrap
from .linear import LoraConv1D, LoraLinear, is_gpt2_conv1d
from .record import AdapterRecord
from .rows import RowPlan, SlotTable, kept_tokens, rows_in_force
from .saved import SavedModule

__all__ = [
    "KINDS",
    "AdapterRecord",
    "LoraConv",
    "LoraConv1D",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "RowPlan",
    "SavedModule",
    "SlotTable",
    "adapter_params",
    "is_gpt2_conv1d",
    "kind_class",
    "kind_of",
    "register",
    "kept_tokens",
    "rows_in_force",
    "shape_of",
    "wrap",
]
