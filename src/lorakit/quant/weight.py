"""``QuantizedWeight``: a frozen weight held as 4-bit (or 8-bit) codes and block scales.

The quantization belongs to the weight, not to a layer class per backend (torchao's NF4 tensor is
the model): a layer that owns a ``QuantizedWeight`` where it would own a ``weight`` parameter
computes with :func:`lorakit.quant.quantized_linear` instead of ``F.linear`` and nothing else
changes. It is a small ``nn.Module`` so that ``.to(device)``, ``deepcopy``, ``state_dict`` and
FSDP2's ``fully_shard`` carry it along with its layer, and it answers ``shape``, ``dtype``,
``device`` and ``numel()`` like the tensor it stands for.

What it stores (n = elements, B = block size; bitsandbytes' names in brackets):

    packed         (ceil(n/2), 1) uint8   two 4-bit codes a byte, first in the high nibble [weight]
    absmax         (n/B,) float32 block scales, or uint8 codes of them when double-quantized
    code           (16,) float32          the codebook                                  [quant_map]
    nested_absmax  (n/B/256,) float32     scales of the absmax codes                [nested_absmax]
    nested_code    (256,) float32         the 8-bit dynamic map                  [nested_quant_map]
    offset         float                  mean absmax, subtracted before the nested quantization

``packed``, ``absmax`` and ``nested_absmax``, the tensors that grow with the weight, are held as
frozen uint8 parameters of their bytes (``packed``, ``absmax_bytes``, ``nested_absmax_bytes``;
``absmax`` and ``nested_absmax`` are typed views of them), so that ``fully_shard`` shards them
(see :mod:`lorakit.quant.storage` for why); the codebooks are buffers. None ever needs a gradient.

NF4 with double quantization at B = 64 costs 4 + 8/64 + 32/(64·256) = 4.127 bits per weight
(QLoRA paper, section 3), about 0.129 of float32.

In a state dict it is written in bitsandbytes' 4-bit serialization, the layout transformers uses
for prequantized checkpoints (``x.weight``, ``x.weight.absmax``, ``x.weight.quant_map``,
``x.weight.nested_absmax``, ``x.weight.nested_quant_map`` and the JSON of the remaining fields as
uint8 in ``x.weight.quant_state.bitsandbytes__nf4``), and read back from it.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import QuantError
from . import blockwise as bw
from .bnb_state import NESTED_KEYS, QUANT_STATE, check_entries, read_fields
from .codebooks import FOUR_BIT, bits_of, check_quant_type, codebook
from .storage import as_storage, typed

PACKED = "packed"  # where a layer hands the packed codes (its own ``weight`` key) to the weight


class QuantizedWeight(nn.Module):
    """A blockwise-quantized weight; see the module docstring. Build it with :meth:`quantize`."""

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        *,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        quant_type: str,
        blocksize: int,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        offset: float | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.register_parameter("packed", as_storage(packed))
        self.register_parameter("absmax_bytes", as_storage(absmax))
        self.register_parameter(
            "nested_absmax_bytes", None if nested_absmax is None else as_storage(nested_absmax)
        )
        self._absmax_dtype = absmax.dtype  # uint8 codes when double-quantized, else float32
        self.register_buffer("code", code)
        self.register_buffer("nested_code", nested_code)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.quant_type = check_quant_type(quant_type)
        self.blocksize = bw.check_blocksize(blocksize)
        self.offset = None if offset is None else float(offset)
        #: dtype of the matmul: inputs are cast to it and the weight dequantized to it
        self.compute_dtype = compute_dtype or dtype
        #: set on a weight re-quantized after a merge (see ``lorakit.quant.requantize``)
        self.requant_error = None
        self._check()

    # -- building --------------------------------------------------------------------------
    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        quant_type: str = "nf4",
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantizedWeight:
        """Quantize a float tensor blockwise (bit-identical to bitsandbytes' ``quantize_4bit``)."""
        check_quant_type(quant_type)
        bw.check_blocksize(blocksize)
        flat = bw.flat_float32(weight)
        if flat.numel() == 0:
            raise QuantError("cannot quantize an empty weight")
        if quant_type in FOUR_BIT:
            packed, absmax = bw.quantize_4bit(flat, quant_type, blocksize)
        else:
            packed, absmax = bw.quantize_int8(flat, blocksize)
        nested = dict(nested_absmax=None, nested_code=None, offset=None)
        if double_quant:
            absmax, nested_absmax, offset = bw.double_quantize(absmax)
            nested = dict(
                nested_absmax=nested_absmax,
                nested_code=codebook("dynamic", flat.device),
                offset=offset.item(),
            )
        return cls(
            packed,
            absmax,
            codebook(quant_type, flat.device),
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            quant_type=quant_type,
            blocksize=blocksize,
            compute_dtype=compute_dtype,
            **nested,
        )

    def _check(self) -> None:
        n = self.shape.numel()
        blocks = -(-n // self.blocksize)
        bits = bits_of(self.quant_type)
        want = {
            "packed": (-(-n * bits // 8), torch.uint8),
            "absmax": (blocks, torch.uint8 if self.double_quant else torch.float32),
            "code": (2**bits, torch.float32),
        }
        if self.double_quant:
            want["nested_absmax"] = (-(-blocks // bw.NESTED_BLOCKSIZE), torch.float32)
            want["nested_code"] = (256, torch.float32)
        problems = []
        for name, (numel, dtype) in want.items():
            t = getattr(self, name)
            if t is None or t.numel() != numel or t.dtype != dtype:
                got = "nothing" if t is None else f"{t.numel()} {t.dtype} values"
                problems.append(f"{name} should hold {numel} {dtype} values, got {got}")
        if self.double_quant != (self.offset is not None):
            problems.append("double quantization needs both nested statistics and an offset")
        if problems:
            raise QuantError(
                f"inconsistent {self.quant_type} weight of shape {tuple(self.shape)} "
                f"(block {self.blocksize}): " + "; ".join(problems)
            )

    # -- what it holds ----------------------------------------------------------------------
    @property
    def absmax(self) -> torch.Tensor:
        """(n/B,) block scales: float32, or their uint8 codes when double-quantized (a view)."""
        stored = self.absmax_bytes
        return typed(stored, self._absmax_dtype, (stored.shape[0],))

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        """(n/B/256,) float32 scales of the absmax codes (a view), None without double quant."""
        stored = self._parameters["nested_absmax_bytes"]
        return None if stored is None else typed(stored, torch.float32, (stored.shape[0],))

    # -- what it stands for ----------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self._parameters["nested_absmax_bytes"] is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    @property
    def dense_size(self) -> int:
        """Float32 elements :meth:`dequantize` needs for its ``out`` buffer."""
        return bw.dense_size(self.packed, self.code)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor it holds (codes, scales, codebooks), on all ranks together."""
        held = (*self.parameters(), *self.buffers())
        return sum(t.numel() * t.element_size() for t in held)

    def scales(self) -> torch.Tensor:
        """The per-block absmax values in float32, undoing the double quantization if any."""
        if not self.double_quant:
            return self.absmax
        return bw.dequantize_dynamic(
            self.absmax, self.nested_absmax, self.nested_code, bw.NESTED_BLOCKSIZE, self.offset
        )

    def dequantize(
        self, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight as a dense tensor of ``shape``, in ``dtype`` (default: its own dtype).

        Values are computed in float32 (``code[q] · absmax``) and cast once, as bitsandbytes does.
        ``out``: a float32 buffer of at least :attr:`dense_size` elements for those values.
        Under FSDP2 this works while the weight's unit is gathered (in its forward and backward,
        or after ``unit.unshard()``); on the shards alone it is a :class:`QuantError`.
        """
        if hasattr(self.packed, "placements"):  # a DTensor: only this rank's shard is here
            raise QuantError(
                f"this {self.quant_type} weight of shape {tuple(self.shape)} is sharded by FSDP "
                "and holds only this rank's part of its codes; decode it inside its unit's "
                "forward or after unit.unshard()"
            )
        out = bw.dequantize_codes(
            self.packed, self.scales(), self.code, self.numel(), self.blocksize, out
        ).view(self.shape)
        dtype = dtype or self.dtype
        return out if dtype == torch.float32 else out.to(dtype)

    def extra_repr(self) -> str:
        dq = ", double quant" if self.double_quant else ""
        shape = "x".join(map(str, self.shape))
        compute = str(self.compute_dtype).removeprefix("torch.")
        return f"{self.quant_type}, {shape}, block {self.blocksize}{dq}, compute {compute}"

    # -- bitsandbytes' serialization -------------------------------------------------------
    def to_bnb(self) -> dict[str, torch.Tensor]:
        """The entries of bitsandbytes' layout, keyed by suffix ("" is the packed weight)."""
        fields: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {"": self.packed, "absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code
            fields["nested_blocksize"] = bw.NESTED_BLOCKSIZE
            fields["nested_dtype"] = "float32"
            fields["nested_offset"] = self.offset
        owner = "bitsandbytes" if self.quant_type in FOUR_BIT else "lorakit"
        text = json.dumps(fields).encode("utf-8")
        out[f"{QUANT_STATE}{owner}__{self.quant_type}"] = torch.tensor(
            list(text), dtype=torch.uint8, device=self.device
        )
        return out

    @classmethod
    def from_bnb(
        cls,
        entries: dict[str, torch.Tensor],
        compute_dtype: torch.dtype | None = None,
        *,
        key: str = "weight",
    ) -> QuantizedWeight:
        """Read the entries of bitsandbytes' layout (keyed by suffix, "" the packed weight).

        Every entry is checked first (see :mod:`lorakit.quant.bnb_state`); a bad one is a
        :class:`QuantError` naming it as ``key`` + suffix.
        """
        states = [k for k in entries if k.startswith(QUANT_STATE)]
        if len(states) != 1:
            raise QuantError(
                f"{key} needs one '{key}.{QUANT_STATE}bitsandbytes__<type>' entry, "
                f"found {[f'{key}.{s}' for s in states] or 'none'}"
            )
        fields = read_fields(f"{key}.{states[0]}", entries[states[0]])
        check_entries(key, entries, fields)
        packed = entries[""]
        if packed.dtype != torch.uint8:  # a quant_storage other than uint8: same bytes
            packed = packed.contiguous().view(torch.uint8)
        nested = {}
        if "nested_offset" in fields:
            nested = dict(
                nested_absmax=entries["nested_absmax"].float(),
                nested_code=entries["nested_quant_map"].float(),
                offset=float(fields["nested_offset"]),
            )
        return cls(
            packed.reshape(-1, 1),
            entries["absmax"],
            entries["quant_map"].float(),
            shape=fields["shape"],
            dtype=fields["dtype"],
            quant_type=fields["quant_type"],
            blocksize=fields["blocksize"],
            compute_dtype=compute_dtype,
            **nested,
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for suffix, value in self.to_bnb().items():
            key = prefix + suffix if suffix else prefix[:-1]  # the packed codes: "x.weight"
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        entries = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        packed = entries.pop(PACKED, None)
        if packed is None:
            missing_keys.append(prefix[:-1])
            return
        known = {"absmax", "quant_map", *NESTED_KEYS}
        states = [k for k in entries if k.startswith(QUANT_STATE)]
        unexpected_keys.extend(prefix + k for k in entries if k not in known and k not in states)
        try:
            if states:  # quantized entries: adopt them as they are
                new = QuantizedWeight.from_bnb(
                    {"": packed, **{k: v for k, v in entries.items() if k in known or k in states}},
                    key=prefix[:-1],
                )
            elif (
                isinstance(packed, torch.Tensor) and packed.is_floating_point()
            ):  # a full-precision weight: quantize it like this one
                new = QuantizedWeight.quantize(
                    packed,
                    self.quant_type,
                    blocksize=self.blocksize,
                    double_quant=self.double_quant,
                )
            else:
                kind = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
                raise QuantError(f"{prefix[:-1]}: a {kind} weight without its quantization state")
        except QuantError as exc:
            errors.append(str(exc))
            return
        if new.shape != self.shape:
            errors.append(
                f"size mismatch for {prefix[:-1]}: the checkpoint holds a weight of shape "
                f"{tuple(new.shape)}, the model one of {tuple(self.shape)}"
            )
            return
        self._adopt(new)

    def _adopt(self, other: QuantizedWeight) -> None:
        """Take over another weight's data and format, on this weight's device."""
        device = self.device
        for name, value in other._parameters.items():
            if value is not None and device.type != "meta" and value.device != device:
                value = nn.Parameter(value.to(device), requires_grad=False)
            self._parameters[name] = value
        for name, value in other._buffers.items():
            if value is not None and device.type != "meta":
                value = value.to(device)
            self._buffers[name] = value
        self._absmax_dtype = other._absmax_dtype
        self.dtype, self.quant_type = other.dtype, other.quant_type
        self.blocksize, self.offset = other.blocksize, other.offset

    def _apply(self, fn, recurse=True):
        # Moves follow the module (.to(device), .cuda()); dtype casts do not: codes, scales and
        # codebooks keep their dtypes (a float16 absmax would break bit-compatibility). A stored
        # parameter keeps its identity where torch allows, as nn.Module._apply does.
        for name, param in self._parameters.items():
            if param is None:
                continue
            moved = fn(param)
            if moved.dtype != param.dtype:
                moved = param.to(moved.device)
            if moved is param:
                continue
            if torch._has_compatible_shallow_copy_type(param, moved):
                param.data = moved
            else:
                self._parameters[name] = nn.Parameter(moved, requires_grad=False)
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


def hand_over_packed(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Give a quantized weight its packed codes before ``module`` loads ``state_dict``.

    A layer calls this from its ``_load_from_state_dict``: bitsandbytes' layout stores the codes
    under the layer's own ``weight`` key, which torch would not pass down to the weight module.
    """
    key = prefix + "weight"
    if isinstance(module._modules.get("weight"), QuantizedWeight) and key in state_dict:
        state_dict[f"{key}.{PACKED}"] = state_dict.pop(key)
