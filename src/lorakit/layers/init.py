"""Initialisations that start from the base weight: PiSSA, OLoRA and LoftQ.

Plain LoRA starts with ``B = 0`` and leaves the base alone. These start ``A`` and ``B`` from the
base weight ``W`` (out, in) itself and rewrite the base so that, at step 0, the layer still computes
``W x`` (up to float rounding, or up to the 4-bit rounding on a quantized base). With rank r and
scale s (``alpha / r``):

PiSSA (Meng et al. 2024, section 3): the principal singular triplets train, the rest is frozen.
    W = U S Vᵀ,  A = diag(√(S_r / s)) V_rᵀ   (r, in),  B = U_r diag(√(S_r / s))   (out, r)
    W_res = W - s · B A                      (out, in): the base from now on
``pissa_niter_K`` takes U_r, S_r, V_r from ``torch.svd_lowrank(W, r, niter=K)`` (Halko et al.'s
randomised SVD: seconds instead of minutes on large layers) under a fixed seed, so the same W
always gives the same start (a resumed run, an adapter loaded again).

OLoRA (Büyükakyüz 2024): W = Q R (QR decomposition), A = R[:r] (r, in), B = Q[:, :r] (out, r),
W_res = W - s · B A.

LoftQ (Li et al. 2023, Algorithm 1), for a 4-bit base: alternate quantizing and a rank-r SVD of
what quantizing lost, ``iters`` times (``loftq_iter``):
    Q_0 = quant(W);  L_t R_t = SVD_r(W - deq(Q_t));  Q_{t+1} = quant(W - L_t R_t)
and start from the last pair: the base is Q, and s · B A = L R, so Q + s·B A is closer to W than
QLoRA's Q(W) + 0 (B = L/√s, A = R/√s; PEFT stores B = L, A = R, which is the same at s = 1).

On a quantized base (QPiSSA, the PiSSA paper's section 4.3; OLoRA alike) the factors come from the
dequantized W and the residual is quantized again in the base's format, so the 4-bit base holds
W_res, whose quantization error is smaller than W's: the large singular values are in the adapter.

What is kept for later (``BaseChange``, one per adapter and layer, under the layer's
``lora_initial[name]``; non-persistent buffers, so in no state dict, and moved with the layer):
A₀ and B₀, the adapter as it started (saving converts the trained adapter to a plain LoRA of the
untouched base, ΔW = s (B A - B₀ A₀) = s [B | -B₀] [A | A₀], rank 2r, see ``io/adapter.py``; and
unloading gives the original weight back as W_res + s B₀ A₀), and a sample of the original weight
for the base fingerprint (``io/fingerprint.py``). A₀ and B₀ cost r (in + out) values each.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import QuantizedWeight, QuantLinear

#: the kinds whose weight is a matrix these initialisations can factor
KINDS = ("linear", "conv1d_gpt2")
SAMPLE = 1024  # weight values sampled for the base fingerprint (io/fingerprint.py)
_SEED = 0  # of the randomised SVD (pissa_niter_K): the same W gives the same start


# -- the math, on float32 matrices W (out, in) ---------------------------------------------------
def pissa(weight: torch.Tensor, r: int, scale: float, niter: int | None = None):
    """(A (r, in), B (out, r)) with s·B A the top-r SVD part of ``weight`` (exact SVD, or
    ``svd_lowrank`` with ``niter`` subspace iterations under a fixed seed)."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_SEED)
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scale)  # (r,)
    return root[:, None] * vh, u * root[None, :]


def olora(weight: torch.Tensor, r: int, scale: float):
    """(A = R[:r] (r, in), B = Q[:, :r] (out, r)) from ``weight = Q R``. PEFT's OLoRA: the scale
    enters only the residual (W_res = W - s·B A)."""
    q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (out, r), R (r, in)) with L R the best rank-r approximation of ``matrix``
    (``L = U_r √S_r``, ``R = √S_r V_rᵀ``, as LoftQ's ``_low_rank_decomposition``)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


def loftq(weight: torch.Tensor, r: int, scale: float, iters: int, quantize):
    """(A, B, Q): ``quantize`` maps a float (out, in) matrix to a ``QuantizedWeight``; Q is the
    base to train on, and Q + s·B A approximates ``weight`` (see the module docstring)."""
    residual = weight
    for step in range(iters):
        q = quantize(residual)
        lost = weight - q.dequantize(torch.float32)
        low, high = low_rank(lost, r)
        if step + 1 < iters:
            residual = weight - low @ high
    root = scale**0.5
    return high / root, low / root, q


# -- what is kept per adapter ---------------------------------------------------------------------
class BaseChange(nn.Module):
    """What a base-changing initialisation kept for one adapter of one layer (module docstring).

    ``a0`` (r, in), ``b0`` (out, r): the adapter at init, in its dtype; ``sample``: the values of
    the original weight the fingerprint hashes, ``kind`` their dtype name (``"float32"``, or
    ``"nf4"`` for a quantized base's codes); ``restorable``: whether the original weight is
    W_res + s B₀ A₀ (a float base; a quantized residual cannot give the original codes back).
    """

    def __init__(self, init: str, a0, b0, sample, kind: str, restorable: bool) -> None:
        super().__init__()
        self.init = init
        self.register_buffer("a0", a0, persistent=False)
        self.register_buffer("b0", b0, persistent=False)
        self.register_buffer("sample", sample, persistent=False)
        self.kind = kind
        self.restorable = restorable

    def extra_repr(self) -> str:
        return f"{self.init}, r={self.a0.shape[0]}, base {self.kind}"


def changes(layer: nn.Module) -> nn.ModuleDict:
    """The layer's ``lora_initial`` (created empty on first use)."""
    found = layer._modules.get("lora_initial")
    if found is None:
        found = nn.ModuleDict()
        layer.add_module("lora_initial", found)
    return found


def base_change(layer: nn.Module, name: str | None = None) -> BaseChange | None:
    """The ``BaseChange`` of adapter ``name`` on ``layer`` (any adapter's when None), or None."""
    found = layer._modules.get("lora_initial")
    if not found:
        return None
    if name is None:
        return next(iter(found.values()))
    return found[name] if name in found else None


def problem(
    module: nn.Module, kind: str, slices, init: str, use_dora: bool, r: int, quantize: bool = False
) -> str:
    """Why ``init`` cannot start an adapter of rank ``r`` on ``module`` (a base module of
    ``kind``, or the LoRA layer already around it), or ``""``; ``quantize``: the residual is to
    be quantized (``quantize_base``)."""
    weight = getattr(module, "weight", None)
    if kind not in KINDS:
        return f"{init} factors a weight matrix; this is a {kind} layer (linear layers only)"
    if slices:
        return f"{init} cannot start fused slices (each slice would need its own residual)"
    if use_dora:
        return f"{init} with use_dora=True is not available (DoRA's magnitude is of W, not W_res)"
    if base_change(module) is not None:
        other = next(iter(module._modules["lora_initial"]))
        return (
            f"adapter {other!r} already rewrote this base weight ({base_change(module).init}); "
            "two base-changing adapters cannot share a layer"
        )
    if getattr(module, "merged_adapters", None):
        return "an adapter is merged into this weight; unmerge first"
    if weight is None or weight.device.type == "meta":
        return f"{init} needs the base weight's values (it is on the meta device)"
    quantized = isinstance(weight, QuantizedWeight)
    if init == "loftq" and quantized:
        return (
            "LoftQ starts from the full-precision weight and quantizes it itself: apply it to the "
            "model before lorakit.quantize (it quantizes the layers it adapts; with `lorakit "
            "train`, method: qlora does this in that order)"
        )
    if (init == "loftq" or quantize) and kind != "linear":
        return "a 4-bit residual needs an nn.Linear base (a 4-bit GPT-2 Conv1D does not exist)"
    if not quantized and not weight.dtype.is_floating_point:
        return f"{init} needs a floating-point or 4-bit base weight, not {weight.dtype}"
    if quantized and weight.quant_type not in ("nf4", "fp4", "int8"):  # pragma: no cover
        return f"{init} cannot re-quantize a {weight.quant_type} weight"
    out_f, in_f = (weight.shape[1], weight.shape[0]) if kind == "conv1d_gpt2" else weight.shape
    if r > min(in_f, out_f):
        return f"r={r} exceeds the weight's rank bound min(in, out) = {min(in_f, out_f)}"
    return ""


def fingerprint_values(weight) -> tuple[torch.Tensor | None, str]:
    """(values the base fingerprint samples, their dtype name): a float weight itself, or a
    quantized weight's packed codes named by its type; (None, "") for anything else."""
    if isinstance(weight, torch.Tensor):
        return weight, str(weight.dtype).removeprefix("torch.")
    packed = getattr(weight, "packed", None)
    if isinstance(packed, torch.Tensor) and getattr(weight, "quant_type", None):
        return packed, str(weight.quant_type)
    return None, ""


def sample_of(values: torch.Tensor) -> torch.Tensor:
    """At most ``SAMPLE`` values of a tensor, strided over all of it, on the CPU."""
    flat = values.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE].cpu()


def _matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's base weight as a float32 (out, in) matrix (dequantized when quantized)."""
    weight = layer.weight
    dense = weight.dequantize(torch.float32) if isinstance(weight, QuantizedWeight) else weight
    dense = dense.detach().float()
    return dense.t() if layer.fan_in_fan_out else dense


def loftq_quantizer(dtype: torch.dtype):
    """LoftQ's base format: NF4 with double quantization in blocks of 64, ``lorakit.quantize``'s
    and ``method: qlora``'s default, so with ``loftq_iter=1`` Q is exactly ``quantize(W)``."""

    def quantize(matrix: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight.quantize(matrix.to(dtype), "nf4", blocksize=64, double_quant=True)

    return quantize


@torch.no_grad()
def initialise(
    layer: nn.Module, name: str, init: str, loftq_iter: int = 1, quantize_base: bool = False
):
    """Start adapter ``name`` of ``layer`` from its base weight and rewrite the base (module
    docstring); returns what :func:`put_back` needs to undo it (the original weight, which the
    layer no longer holds, and base module shell). The caller has checked the layer can take it.
    ``quantize_base``: PiSSA or OLoRA on a full-precision base quantize the residual as LoftQ's
    base is (QPiSSA as the PiSSA paper makes it: the factors from the full-precision W)."""
    record = layer.record(name)
    r, s = record.rank, record.scale
    a_param, b_param = layer._A[name], layer._B[name]
    original = layer.weight
    quantized = isinstance(original, QuantizedWeight)
    values, kind = fingerprint_values(original)
    sample = sample_of(values)
    w = _matrix(layer)
    if init == "loftq":
        a, b, new = loftq(w, r, s, loftq_iter, loftq_quantizer(original.dtype))
    else:
        niter = int(init.rpartition("_")[2]) if init.startswith("pissa_niter_") else None
        a, b = pissa(w, r, s, niter) if init.startswith("pissa") else olora(w, r, s)
    a_param.copy_(a)
    b_param.copy_(b)
    if init != "loftq":
        # from A₀ and B₀ as stored (their dtype), so that W_res + s B₀ A₀ = W to float rounding
        residual = w - s * (b_param.float() @ a_param.float())
        residual = residual.t() if layer.fan_in_fan_out else residual
        if quantize_base and not quantized:
            new = loftq_quantizer(original.dtype)(residual)
        elif quantized:
            new = QuantizedWeight.quantize(
                residual.to(original.dtype),
                original.quant_type,
                blocksize=original.blocksize,
                double_quant=original.double_quant,
                compute_dtype=original.compute_dtype,
            )
        else:
            new = nn.Parameter(residual.to(original.dtype).contiguous(), requires_grad=False)
    elif original.dtype != new.dtype:  # pragma: no cover - loftq_quantizer keeps the dtype
        raise AssertionError("LoftQ changed the weight's dtype")
    shell = layer._shell
    if init == "loftq":
        sample, kind = sample_of(new.packed), new.quant_type  # the base the adapter is for: Q
    if isinstance(new, QuantizedWeight) and not quantized:
        # a float base's shell (nn.Linear) becomes a QuantLinear's, so unload gives one back
        quantized_shell = QuantLinear(new, None)
        quantized_shell._modules["weight"] = None
        object.__setattr__(layer, "_shell", quantized_shell)
    _set_weight(layer, new)
    restorable = not isinstance(new, QuantizedWeight)
    a0, b0 = a_param.detach().clone(), b_param.detach().clone()
    changes(layer)[name] = BaseChange(init, a0, b0, sample, kind, restorable)
    layer._stack_cache = None
    return original, shell


def _set_weight(layer: nn.Module, weight) -> None:
    """``layer.weight = weight``, a Parameter or a ``QuantizedWeight`` (module) either way."""
    layer._parameters.pop("weight", None)
    layer._modules.pop("weight", None)
    layer.weight = weight


def put_back(layer: nn.Module, name: str, saved) -> None:
    """Undo :func:`initialise` (``saved``: what it returned): the original weight and shell."""
    original, shell = saved
    _set_weight(layer, original)
    object.__setattr__(layer, "_shell", shell)
    forget(layer, name)


@torch.no_grad()
def original_weight(layer: nn.Module, name: str) -> torch.Tensor:
    """W = W_res + s B₀ A₀ for a base-changing adapter on a float base (in W's layout, dtype)."""
    keep = base_change(layer, name)
    scale = layer.record(name).scale
    delta = scale * (keep.b0.float() @ keep.a0.float())
    delta = delta.t() if layer.fan_in_fan_out else delta
    return (layer.weight.float() + delta).to(layer.weight.dtype)


@torch.no_grad()
def restore(layer: nn.Module, name: str) -> None:
    """Give ``layer`` its original base weight back and forget adapter ``name``'s start (only
    for a ``restorable`` change, and with no adapter merged)."""
    layer.weight = nn.Parameter(original_weight(layer, name), requires_grad=False)
    forget(layer, name)


def forget(layer: nn.Module, name: str) -> None:
    found = layer._modules.get("lora_initial")
    if found is not None and name in found:
        del found[name]
        if not found:
            del layer._modules["lora_initial"]


def converted(tensor: torch.Tensor, layer: nn.Module, name: str, is_a: bool) -> torch.Tensor:
    """A' = [A ; A₀] (2r, in) for ``is_a``, else B' = [B | -B₀] (out, 2r): the trained adapter
    (``tensor``, its A or B as written to a file) as a plain LoRA of the original base.

    W + s B' A' = W_res + s B A, since W = W_res + s B₀ A₀ and B' A' = B A - B₀ A₀ (PEFT's
    ``subtract_mutated_init``); the scale is kept, the rank doubles.
    """
    keep = base_change(layer, name)
    if is_a:
        return torch.cat([tensor, keep.a0.to(tensor.device, tensor.dtype)], 0)
    return torch.cat([tensor, -keep.b0.to(tensor.device, tensor.dtype)], 1)
