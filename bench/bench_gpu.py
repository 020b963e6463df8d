"""GPU figures: lorakit with its fused Triton kernels against PEFT and bitsandbytes, bf16.

Run by ``bash bench/gpu.sh`` on a machine with a CUDA device (it also runs the device tests
first); without one, ``run`` returns every row marked "not measured: no GPU available", which is
what BENCHMARKS.md records until a GPU run replaces it. ``python bench/bench_gpu.py --dry-run``
runs the same measuring code on the CPU with tiny sizes (the kernels in Triton's interpreter) to
check the script itself; its numbers mean nothing and are only printed.

Models built in code with random weights (speed does not depend on the values), bf16:
SmolLM2-135M's shape (``_common.SMOLLM2``) and a Llama-shaped ~1.1B model (TinyLlama's shape).
Figures, each measured side by side in one process:

* LoRA training (r=16 all-linear, AdamW, seq 1024): tokens/s and the memory a training step adds
  above the resident models, lorakit with kernels against PEFT, from the same adapter values,
  and the largest difference of their losses step by step;
* QLoRA training (NF4 + double quant): lorakit against PEFT on bitsandbytes' ``Linear4bit``;
* greedy decoding with one unmerged adapter against the base (eager; static cache compiled);
* a mixed batch of 64 rows each with its own adapter (q/k/v/o, r=16) against the base;
* NF4 dequantization of a 4096 x 4096 weight against bitsandbytes' CUDA kernel, and whether the
  two give the same bits.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import _common as C

NAME = "gpu"
TITLE = "GPU: fused kernels against PEFT and bitsandbytes (bf16, one CUDA device)"
ANCHOR_PACKAGES = ["peft", "bitsandbytes", "transformers", "triton"]
NOT_MEASURED = "not measured: no GPU available"
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Sizes:
    models: dict[str, dict]  # label -> LlamaConfig fields
    seq: int = 1024
    batch: int = 4
    steps: int = 3  # timed training steps per round (two rounds, after one warm-up step)
    new_tokens: int = 64
    rows: int = 64  # mixed batch: rows = adapters
    dequant: int = 4096
    compile: bool = True
    budget_s: float = 150.0  # later figures are skipped past this (gpu.sh stops the bench at 270 s)


FULL = Sizes({"SmolLM2-135M-shaped": C.SMOLLM2, "Llama-1.1B-shaped": LLAMA_1B})
DRY = Sizes({"tiny": TINY}, seq=16, batch=2, steps=1, new_tokens=4, rows=6, dequant=256)
DRY.compile = False

# (key, figure, anchor name, goal, unit): the rows this bench reports, in order
FIGURES = [
    ("lora_tps", "LoRA training tokens/s, r=16 all-linear, seq 1024", "peft", ">= 1.5x", "tok/s"),
    ("lora_mem", "LoRA training memory above the models", "peft", "<= 0.6x", "MiB"),
    ("lora_loss", "LoRA largest loss difference vs PEFT, same adapters", "peft", "<= 0.02", ""),
    ("qlora_tps", "QLoRA training tokens/s (NF4, double quant)", "peft+bnb", ">= 1.5x", "tok/s"),
    ("qlora_mem", "QLoRA training memory above the models", "peft+bnb", "<= 1.0x", "MiB"),
    ("decode", "greedy decoding, one unmerged adapter, batch 1", "base", ">= 0.95x", "tok/s"),
    ("mixed", "decoding step, 64 adapters in 64 rows (q/k/v/o r=16)", "base", "<= 1.1x", "s"),
    ("dequant", "NF4 dequantize 4096 x 4096 to bf16", "bitsandbytes", "<= 1.0x", "ms"),
]


def run(threads: int) -> list[dict]:
    if not torch.cuda.is_available():
        return [
            C.row(f"{figure} ({NOT_MEASURED})", None, None, anchor, goal=goal, unit=unit)
            for _, figure, anchor, goal, unit in FIGURES
        ]
    name = torch.cuda.get_device_name(0)
    return [C.row(f"device: {name}", None)] + measure(FULL, torch.device("cuda"))


# -- helpers ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _mib_above(fn, device: torch.device) -> float | None:
    """MiB of device memory ``fn`` needs above what is allocated before it (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


def _llama(config: dict, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: seconds, not a minute, for 1.1B
        model = LlamaForCausalLM(LlamaConfig(**config))
    return model.to(dtype=torch.bfloat16)


def _lorakit(base, targets="all-linear", names=("default",)):
    import lorakit

    model = copy.deepcopy(base)
    for name in names:
        config = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, target_modules=targets)
        lorakit.apply_lora(model, config, adapter_name=name)
    C.nonzero_b([b for _, layer in lorakit.lora_layers(model) for b in layer.lora_B.values()])
    return model


def _peft_like(base, ours):
    """PEFT on ``base`` with lorakit model ``ours``'s adapter values (paths are the same)."""
    from peft import LoraConfig, get_peft_model

    import lorakit

    config = LoraConfig(r=C.RANK, lora_alpha=C.ALPHA, target_modules="all-linear")
    theirs = get_peft_model(base, config)
    with torch.no_grad():
        for path, layer in lorakit.lora_layers(ours):
            target = theirs.base_model.model.get_submodule(path)
            target.lora_A["default"].weight.copy_(layer.lora_A["default"])
            target.lora_B["default"].weight.copy_(layer.lora_B["default"])
    return theirs


def _bnb_4bit(model):
    """The model's decoder linear layers replaced by bitsandbytes' NF4 ``Linear4bit``."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    new = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        compress_statistics=True,
                        quant_type="nf4",
                    )
                    new.load_state_dict(child.to("cpu", torch.float32).state_dict())
                    setattr(parent, name, new.to(device))  # .to() quantizes
    return model


def _train(models: dict, batch: torch.Tensor, sizes: Sizes, device, kernels_for: str) -> dict:
    """Tokens/s, memory above the models and losses per step for each model, trained in turn on
    the same batch (one warm-up step, then two rounds of ``sizes.steps``)."""
    from lorakit import kernels

    optims = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for k, m in models.items()
    }
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    mem = {}

    def step(key):
        with kernels.use_kernels(key == kernels_for):
            loss = models[key](input_ids=batch, labels=batch).loss
            loss.backward()
        optims[key].step()
        optims[key].zero_grad(set_to_none=True)
        losses[key].append(loss.item())

    for key in models:
        mem[key] = _mib_above(lambda k=key: step(k), device)  # the warm-up step
    for _ in range(2):
        for key in models:
            t = _timed(lambda k=key: [step(k) for _ in range(sizes.steps)], device)
            times[key].append(t)
    tokens = batch.numel() * sizes.steps
    tps = {k: tokens / min(v) for k, v in times.items()}
    return dict(tps=tps, mem=mem, losses=losses)


def _loss_gap(losses: dict, a: str, b: str) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(losses[a], losses[b]))


# -- the figures -----------------------------------------------------------------------------
def measure(sizes: Sizes, device: torch.device) -> list[dict]:
    start = time.perf_counter()
    rows = []
    for label, config in sizes.models.items():
        if time.perf_counter() - start > sizes.budget_s:
            rows.append(C.row(f"{label}: training figures skipped (time budget)", None))
            continue
        rows += _training_rows(label, config, sizes, device)
    first = next(iter(sizes.models.items()))
    rows += _decode_rows(first, sizes, device, start)
    rows += _mixed_rows(first, sizes, device)
    rows += _dequant_rows(sizes, device)
    return rows


def _training_rows(label, config, sizes, device) -> list[dict]:
    import lorakit

    base = _llama(config, device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, config["vocab_size"], (sizes.batch, sizes.seq), generator=g)
    batch = batch.to(device)
    ours = _lorakit(base)
    theirs = _peft_like(copy.deepcopy(base), ours)
    got = _train({"lorakit": ours, "peft": theirs}, batch, sizes, device, "lorakit")
    del ours, theirs
    rows = [
        C.row(f"{label}: {FIGURES[0][1]}", got["tps"]["lorakit"], got["tps"]["peft"], "peft",
              goal=">= 1.5x", unit="tok/s"),
        C.row(f"{label}: {FIGURES[1][1]}", got["mem"]["lorakit"], got["mem"]["peft"], "peft",
              goal="<= 0.6x", unit="MiB"),
        C.row(f"{label}: {FIGURES[2][1]}", _loss_gap(got["losses"], "lorakit", "peft"), None,
              goal="<= 0.02"),
    ]  # fmt: skip
    quantized = lorakit.quantize(copy.deepcopy(base), compute_dtype=torch.bfloat16)
    ours = _lorakit(quantized)
    theirs = _peft_like(_bnb_4bit(copy.deepcopy(base)), ours)
    del base
    got = _train({"lorakit": ours, "peft+bnb": theirs}, batch, sizes, device, "lorakit")
    rows += [
        C.row(f"{label}: {FIGURES[3][1]}", got["tps"]["lorakit"], got["tps"]["peft+bnb"],
              "peft+bnb", goal=">= 1.5x", unit="tok/s"),
        C.row(f"{label}: {FIGURES[4][1]}", got["mem"]["lorakit"], got["mem"]["peft+bnb"],
              "peft+bnb", goal="<= 1.0x", unit="MiB"),
    ]  # fmt: skip
    _free(device)
    return rows


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_rows(first, sizes, device, start) -> list[dict]:
    from lorakit import kernels

    label, config = first
    base = _llama(config, device).eval()
    ours = _lorakit(base).eval()
    prompt = torch.randint(0, config["vocab_size"], (1, 32)).to(device)
    new = sizes.new_tokens

    def tps(model, use=False, **options):
        def go():
            with torch.no_grad(), kernels.use_kernels(use):
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0, **options)  # fmt: skip

        go()  # warm-up (and compilation)
        return new / statistics.median(_timed(go, device) for _ in range(3))

    base_tps = tps(base)
    rows = [
        C.row(f"{label}: {FIGURES[5][1]}, eager", tps(ours), base_tps, "base", goal=">= 0.95x",
              unit="tok/s"),
        C.row(f"{label}: {FIGURES[5][1]}, eager with kernels", tps(ours, True), base_tps, "base",
              goal=">= 0.95x", unit="tok/s"),
    ]  # fmt: skip
    if sizes.compile and time.perf_counter() - start < sizes.budget_s:
        figure = f"{label}: {FIGURES[5][1]}, static cache (transformers may compile it)"
        try:
            static = dict(cache_implementation="static")
            rows.append(C.row(figure, tps(ours, **static), tps(base, **static), "base",
                              goal=">= 0.95x", unit="tok/s"))  # fmt: skip
        except Exception as exc:  # a failure is a finding: recorded, the others still run
            rows.append(C.row(f"{figure}: failed ({type(exc).__name__}: {exc})"[:200], None))
    _free(device)
    return rows


def _mixed_rows(first, sizes, device) -> list[dict]:
    import lorakit
    from lorakit import kernels

    label, config = first
    base = _llama(config, device).eval()
    names = [f"a{i}" for i in range(sizes.rows)]
    ours = _lorakit(base, targets=QKVO, names=names).eval()
    prompt = torch.randint(0, config["vocab_size"], (sizes.rows, 16)).to(device)
    new = 16

    def step_time(model, per_row=None, use=False):
        def go():
            with torch.no_grad(), kernels.use_kernels(use):
                if per_row is None:
                    model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)  # fmt: skip
                    return
                with lorakit.adapter_per_row(model, per_row):
                    model.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)  # fmt: skip

        go()
        return statistics.median(_timed(go, device) for _ in range(3)) / new

    base_t = step_time(base)
    figure = f"{label}: {FIGURES[6][1]}"
    rows = [
        C.row(f"{figure}, eager", step_time(ours, names), base_t, "base", goal="<= 1.1x",
              unit="s"),
        C.row(f"{figure}, kernels", step_time(ours, names, True), base_t, "base",
              goal="<= 1.1x", unit="s"),
    ]  # fmt: skip
    _free(device)
    return rows


def _dequant_rows(sizes, device) -> list[dict]:
    import bitsandbytes.functional as F

    from lorakit.kernels import nf4
    from lorakit.quant import QuantizedWeight

    n = sizes.dequant
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = QuantizedWeight.from_bnb({"": packed, **state.as_dict(packed=True)})

    def timing(fn):
        fn()
        return statistics.median(_timed(fn, device) for _ in range(20)) * 1e3

    theirs_t = timing(lambda: F.dequantize_4bit(packed, state))
    ours_t = timing(lambda: nf4.dequantize(ours, torch.bfloat16))
    same = torch.equal(
        nf4.dequantize(ours, torch.bfloat16).view(torch.int16),
        F.dequantize_4bit(packed, state).reshape(n, n).view(torch.int16),
    )
    return [
        C.row(FIGURES[7][1], ours_t, theirs_t, "bitsandbytes", goal="<= 1.0x", unit="ms"),
        C.row("NF4 dequantize: the same bits as bitsandbytes", same, None, met=same),
    ]


def _dry_run() -> int:
    """Every measuring path on the CPU with tiny sizes, kernels in the interpreter; prints."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for r in measure(DRY, torch.device("cpu")):
        print(r["figure"], "|", r["lorakit"], "|", r["anchor"])
    print("dry run finished: the numbers above are from tiny CPU models and mean nothing")
    return 0


if __name__ == "__main__":
    if "--dry-run" not in sys.argv[1:]:
        sys.exit("usage: python bench/bench_gpu.py --dry-run   (the figures: bash bench/gpu.sh)")
    sys.exit(_dry_run())
