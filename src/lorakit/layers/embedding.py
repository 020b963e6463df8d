"""LoRA on ``nn.Embedding``.

An embedding is a linear map applied to one-hot rows, so ``A`` (r, num_embeddings) is read by
lookup: ``A[:, ids]ᵀ`` (..., r), then ``B`` (dim, r) maps up. PEFT's layout and initialisation are
kept for compatibility: here ``A`` starts at zero and ``B`` random, which still makes the update
zero at the start (the LoRA paper only needs the product to start at zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer
from .kinds import register
from .rows import active_plan


@register
class LoraEmbedding(LoraLayer):
    kind = "embedding"
    describes = "nn.Embedding"
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

    @classmethod
    def accepts(cls, module):
        return isinstance(module, nn.Embedding)

    @staticmethod
    def base_shape(module):
        w = module.weight
        return w.shape[0], w.shape[1], f"{w.shape[0]}x{w.shape[1]}"

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            table,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def base_forward(self, x):
        return self._lookup(x, self.weight)

    def adapter_shapes(self, r):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def init_adapter(self, a, b, init, r):
        nn.init.zeros_(a)
        nn.init.normal_(b)

    def lora_forward(self, x, out, a, b, s):
        xa = self._lookup(x, a.t())  # (..., r)
        return out + (F.linear(xa, b) * s).to(out.dtype)

    def forward(self, x):
        # dropout on integer ids makes no sense: the embedding path never applies it
        out = self.base_forward(x)
        plan = active_plan(self.table)
        if plan is not None:
            return self.forward_rows(x, out, plan)
        name = self._route
        if name is None:
            return out
        return self.lora_forward(x, out, self._A[name], self._B[name], self.records[name].scale)

    def rows_forward(self, x, out, a_rows, b_rows, slots):
        """Mixed batch: a_rows (N, R, V), b_rows (N, dim, R), ids x (N, ...)."""
        n = x.shape[0]
        ids = x.reshape(n, -1)  # (N, T)
        index = ids.unsqueeze(1).expand(-1, a_rows.shape[1], -1)
        xa = torch.gather(a_rows, 2, index)  # (N, R, T)
        if self.padding_idx is not None:
            # as F.embedding does on the one-adapter path: no gradient reaches the padding column
            xa = torch.where((ids == self.padding_idx).unsqueeze(1), xa.detach(), xa)
        delta = torch.bmm(b_rows, xa).transpose(1, 2)  # (N, T, dim)
        return out + delta.reshape(out.shape).to(out.dtype)

    def delta_weight(self, name):
        a = self._A[name].float()
        b = self._B[name].float()
        return (b @ a).t() * self.records[name].scale  # (V, dim)
