"""Optional fused kernels (Triton), each with the eager PyTorch path as its reference.

Nothing here is imported by ``import lorakit``: this package's ``__init__`` only answers whether
a kernel may run, and the kernel modules (which import triton) are imported by the layers when a
kernel is actually called.

* :mod:`.lora_linear` ``y = x Wᵀ + bias + s (x Aᵀ) Bᵀ`` forward and backward, W dense or 4-bit
  (decoded tile by tile for few rows, once per product for many), the low-rank term fused into
  the GEMM's epilogue;
* :mod:`.mixed` shrink / expand for mixed-adapter batches driven by a token → adapter map, with
  adapters of different ranks packed without padding (Punica's SGMV, vLLM's lora_shrink/expand);
* :mod:`.nf4` 4-bit (NF4/FP4) dequantization with double-quantized scales, bit-identical to
  :meth:`lorakit.quant.QuantizedWeight.dequantize` and to bitsandbytes, and a dequantize-matmul;
* :mod:`.gemm` the one tiled GEMM the others launch.

A kernel runs where triton imports and the tensors are on a CUDA device, or on the CPU under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how the
test suite checks every kernel on machines without a GPU.

The layers call a kernel only while kernels are switched on (:func:`use_kernels`, or the
environment variable ``LORAKIT_KERNELS=1``). They are **off by default**: the eager path is the
default wherever a kernel has not been measured to be faster, and no GPU figure has been measured
yet (BENCHMARKS.md, section gpu).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

from ..errors import ConfigError

__all__ = ["available", "can_run", "interpreting", "kernels_enabled", "use_kernels", "wanted"]

_state = {"enabled": os.environ.get("LORAKIT_KERNELS", "") == "1"}


@functools.cache
def available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def can_run(t: torch.Tensor) -> bool:
    """Whether a kernel can run on ``t``: triton is there and ``t`` is on CUDA, or on the CPU
    under the interpreter."""
    if not available():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def kernels_enabled() -> bool:
    """Whether the layers use the kernels where they can run (off unless switched on)."""
    return _state["enabled"]


def wanted(t: torch.Tensor) -> bool:
    """The layers' dispatch test: kernels switched on and able to run on ``t``; never while
    ``torch.compile`` traces (the compiled graph keeps the eager ops)."""
    return _state["enabled"] and can_run(t) and not torch.compiler.is_compiling()


@contextlib.contextmanager
def _restoring(previous: bool) -> Iterator[None]:
    try:
        yield
    finally:
        _state["enabled"] = previous


def use_kernels(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Switch the layers' kernels on or off for the process; returns a context manager that
    restores the previous setting, so both ``use_kernels(True)`` and
    ``with use_kernels(True): ...`` work.

    Raises :class:`~lorakit.errors.ConfigError` when switching on without triton installed.
    """
    if enabled and not available():
        raise ConfigError(
            "use_kernels(True) needs triton, which is not installed "
            "(pip install 'lorakit[kernels]')"
        )
    previous = _state["enabled"]
    _state["enabled"] = bool(enabled)
    return _restoring(previous)
