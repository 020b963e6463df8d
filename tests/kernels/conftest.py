"""The kernels run where they can: compiled on a CUDA device, else on the CPU in Triton's
interpreter. ``TRITON_INTERPRET`` must be set before triton is first imported: the suite's root
conftest sets it (where no CUDA device is present) before any test module is imported; it is set
here too for a run of this folder alone under another root."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
