"""The kernels run where they can: compiled on a CUDA device, else on the CPU in Triton's
interpreter. ``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here,
at collection, and only where no CUDA device is present."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
