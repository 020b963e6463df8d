"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (groups = 1).

``A`` is a convolution with the base's kernel, stride, padding and dilation from ``in`` to ``r``
channels, (r, in, *kernel); ``B`` a 1×1 convolution from ``r`` to ``out``, (out, r, 1, ...): PEFT's
layout. Their product is a convolution with the base's kernel shape, so the merge is exact:
``ΔW = s · (B.flatten(1) @ A.flatten(1)).view(out, in, *kernel)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer
from .kinds import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@register
class LoraConv(LoraLayer):
    kind = "conv"
    describes = "nn.Conv1d/2d/3d (groups=1)"

    @classmethod
    def accepts(cls, module):
        conv = nn.modules.conv
        if not isinstance(module, conv._ConvNd) or isinstance(module, conv._ConvTransposeNd):
            return False
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        return True

    @staticmethod
    def base_shape(module):
        w = module.weight
        kernel = "x".join(str(k) for k in w.shape[2:])
        return w.shape[1], w.shape[0], f"{w.shape[1]}->{w.shape[0]} k{kernel}"

    @classmethod
    def count_params(cls, module, in_f, out_f, r, slices) -> int:
        kernel = 1
        for k in module.weight.shape[2:]:
            kernel *= k
        return r * in_f * kernel + out_f * r

    def __init__(self, base: nn.modules.conv._ConvNd) -> None:
        super().__init__(base)
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = tuple(base.kernel_size)
        self._dims = len(self.kernel_size)

    def base_forward(self, x):
        return self._shell._conv_forward(x, self.weight, self.bias)

    def adapter_shapes(self, r):
        ones = (1,) * self._dims
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r, *ones)

    def lora_forward(self, x, out, a, b, s):
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        xa = self._shell._conv_forward(x, a, None)  # (N, r, *spatial)
        return out + (_CONV[self._dims](xa, b) * s).to(out.dtype)

    def rows_forward(self, x, out, a, b, slots):
        # A mixed batch on a convolution: one adapter group at a time (convolutions take one
        # kernel per call); rows of the base slot are left alone.
        result = out.clone()
        ones = (1,) * self._dims
        for slot in torch.unique(slots).tolist():
            if slot == 0:
                continue
            rows = (slots == slot).nonzero().flatten()
            i = rows[0]
            xa = self._shell._conv_forward(x[rows].to(a.dtype), a[i], None)
            delta = _CONV[self._dims](xa, b[i].view(b.shape[1], b.shape[2], *ones))
            result[rows] = out[rows] + delta.to(out.dtype)
        return result

    def stacked(self, table):
        a, b = super().stacked(table)
        return a, b.flatten(2)  # B per adapter as (out, R) for the common padding code

    def delta_weight(self, name):
        a = self._A[name].float()
        b = self._B[name].float()
        delta = b.flatten(1) @ a.flatten(1)  # (out, in·k)
        return delta.view(self.weight.shape) * self.records[name].scale
