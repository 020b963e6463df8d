"""LoftQ and QPiSSA against plain QLoRA's start, and the init time of PiSSA, PiSSA-niter, OLoRA.

On the embedded SmolLM2-135M-Instruct (its real weights: the figures depend on them), every
linear layer but the tied head, r=16, alpha=32 (s = 2), NF4 with double quantization at block 64:

* the quantization error at step 0, ||W - (Q + s·B A)||_F, against plain QLoRA's ||W - Q(W)||_F
  (B = 0): the relative reduction 1 - ours / plain, per layer kind (the Frobenius norm over all
  layers of that kind) and over all layers, for LoftQ with ``loftq_iter`` 1 and 2 and for QPiSSA
  (PiSSA from the full-precision W, the residual quantized: ``quantize_base=True``);
* the wall time of ``apply_lora`` with ``init`` pissa (full SVD), pissa_niter_4 and olora on all
  210 linear layers, against plain LoRA's (kaiming) init, once each after one warm-up;
* with ``--demo``, the held-out exact match of the demo task (``examples/date_demo.yaml``) with
  ``training.method=qlora``, plain against ``lora.init=loftq``, from two runs in fresh processes
  (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common as C

NAME = "loftq"
TITLE = "LoftQ / QPiSSA start against QLoRA's, and PiSSA / OLoRA init time (SmolLM2-135M)"
ANCHOR_PACKAGES = ["transformers"]
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEMO = Path(__file__).resolve().parents[1] / "examples" / "date_demo.yaml"


def _errors(model) -> dict[str, dict[str, float]]:
    """{kind: {method: squared Frobenius error summed over that kind's layers}}."""
    from lorakit.layers import init as base_init
    from lorakit.quant import QuantizedWeight

    scale = C.ALPHA / C.RANK
    quantize = base_init.loftq_quantizer(torch.float32)
    out = {kind: dict.fromkeys(("qlora", "loftq1", "loftq2", "qpissa"), 0.0) for kind in KINDS}
    for path, module in model.named_modules():
        kind = path.rpartition(".")[2]
        if kind not in KINDS:
            continue
        w = module.weight.detach().float()
        sums = out[kind]
        sums["qlora"] += float((w - quantize(w).dequantize(torch.float32)).norm() ** 2)
        for iters in (1, 2):
            a, b, q = base_init.loftq(w, C.RANK, scale, iters, quantize)
            approx = q.dequantize(torch.float32) + scale * b @ a
            sums[f"loftq{iters}"] += float((w - approx).norm() ** 2)
        a, b = base_init.pissa(w, C.RANK, scale)
        residual = QuantizedWeight.quantize(w - scale * b @ a).dequantize(torch.float32)
        sums["qpissa"] += float((w - (residual + scale * b @ a)).norm() ** 2)
    return out


def _init_seconds(base) -> dict[str, float]:
    import lorakit

    times = {}
    for init in ("kaiming", "pissa", "pissa_niter_4", "olora"):
        config = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, init=init)
        for _ in range(2):  # the first warms up (allocations, LAPACK's threads)
            model = copy.deepcopy(base)
            start = time.perf_counter()
            lorakit.apply_lora(model, config)
            elapsed = time.perf_counter() - start
            del model
        times[init] = elapsed
    return times


def _demo(threads: int, out: Path, extra: list[str]) -> float:
    command = [
        sys.executable, "-m", "lorakit.cli.main", "train", str(DEMO), f"output.dir={out}",
        f"training.threads={threads}", "training.checkpoint_every=0", "evaluation.every=0",
        "output.plot=false", "training.method=qlora", *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return 100 * summary["after"]["exact"] / summary["after"]["total"]


def run(threads: int, demo: bool = False) -> list[dict]:
    from lorakit.models import load_model

    torch.set_num_threads(threads)
    base, _ = load_model(None)
    base.eval()
    errors = _errors(base)
    rows = []
    total = {m: sum(e[m] for e in errors.values()) for m in ("qlora", "loftq1", "loftq2", "qpissa")}
    for kind, sums in [*errors.items(), ("all", total)]:
        plain = math.sqrt(sums["qlora"])
        for method, label in (("loftq1", "LoftQ, 1 iter"), ("loftq2", "LoftQ, 2 iters")) + (
            (("qpissa", "QPiSSA"),) if kind == "all" else ()
        ):
            ours = math.sqrt(sums[method])
            rows.append(
                C.row(
                    f"{label}: ||W - (Q + sBA)||_F, {kind} layers (QLoRA: ||W - Q(W)||_F)",
                    ours,
                    plain,
                    "plain QLoRA init",
                    ours / plain,
                    "< 1x",
                    "",
                    reduction=f"{100 * (1 - ours / plain):.1f}%",
                )
            )
    times = _init_seconds(base)
    for init in ("pissa", "pissa_niter_4", "olora"):
        rows.append(
            C.row(
                f"apply_lora init={init} on all 210 linear layers (r={C.RANK})",
                times[init],
                times["kaiming"],
                "init kaiming (plain LoRA)",
                times[init] / times["kaiming"],
                "",
                "s",
            )
        )
    if demo:
        with tempfile.TemporaryDirectory() as tmp:
            plain = _demo(threads, Path(tmp) / "qlora", [])
            loftq = _demo(threads, Path(tmp) / "loftq", ["lora.init=loftq"])
        rows.append(
            C.row(
                "demo task held-out exact match, QLoRA + LoftQ",
                loftq,
                plain,
                "QLoRA",
                None,
                "",
                "%",
            )
        )
    return rows


if __name__ == "__main__":
    threads = torch.get_num_threads()
    for row in run(threads, demo="--demo" in sys.argv):
        extra = f" ({row['reduction']})" if "reduction" in row else ""
        print(f"{row['figure']}: {row['lorakit']:.4g} vs {row['anchor']:.4g}{extra}")
