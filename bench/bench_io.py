"""Adapter files: ``save_adapter`` / ``load_adapter`` against PEFT's ``save_pretrained`` /
``PeftModel.from_pretrained``.

SmolLM2-135M-shaped Llama, r=16 on every linear layer (210 modules, 4.9 M adapter parameters, an
18.7 MiB file). Saving: each round writes both adapters once, in turns (lorakit replaces its
previous directory, with its fsyncs and atomic rename; PEFT overwrites its files without fsync);
``os.sync()`` runs untimed before each save, so neither pays for flushing the other's file.
Loading: each round deep-copies the base twice (not timed), then injects and loads each library's
own file into a fresh copy (``load_adapter`` / ``from_pretrained`` do both). The figures are
medians over rounds; the ratios are medians of per-round ratios, the order alternating.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import _common as C

NAME = "io"
TITLE = "Adapter files: save_adapter / load_adapter vs PEFT"
ANCHOR_PACKAGES = ["peft", "transformers", "safetensors"]
ROUNDS = 7


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(threads: int) -> list[dict]:
    from peft import PeftModel

    import lorakit
    from lorakit.io import fingerprint as fp

    base = C.smollm2_shaped()
    ours = C.with_lorakit(base)
    theirs = C.with_peft(base)
    paths = [p for p, _ in lorakit.lora_layers(ours)]
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-io-"))
    ours_dir, peft_dir = root / "lorakit", root / "peft"
    savers = {
        "lorakit": lambda: lorakit.save_adapter(ours, ours_dir, overwrite=True),
        "peft": lambda: theirs.save_pretrained(peft_dir),
    }
    loaders = {
        "lorakit": lambda model: lorakit.load_adapter(model, ours_dir),
        "peft": lambda model: PeftModel.from_pretrained(model, peft_dir),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save: dict[str, list[float]] = {"lorakit": [], "peft": []}
        load: dict[str, list[float]] = {"lorakit": [], "peft": []}
        for i in range(ROUNDS + 1):
            order = ["lorakit", "peft"] if i % 2 == 0 else ["peft", "lorakit"]
            for name in order:
                os.sync()
                seconds = _timed(savers[name])
                if i:  # the first round warms caches and lazy imports
                    save[name].append(seconds)
            copies = {name: copy.deepcopy(base) for name in order}
            for name in order:
                seconds = _timed(loaders[name], copies[name])
                if i:
                    load[name].append(seconds)
            del copies
    fingerprint = statistics.median(_timed(fp.fingerprint, ours, paths) for _ in range(9))
    sizes = {
        name: (d / "adapter_model.safetensors").stat().st_size / 2**20
        for name, d in (("lorakit", ours_dir), ("peft", peft_dir))
    }
    timed = [
        ("save r=16 all-linear adapter (210 modules)", save, "peft save_pretrained"),
        ("inject + load that adapter into a fresh base", load, "peft PeftModel.from_pretrained"),
    ]
    return [
        *(
            C.row(
                f"{figure}, median of {ROUNDS}",
                statistics.median(times["lorakit"]) * 1e3,
                statistics.median(times["peft"]) * 1e3,
                anchor,
                C.median_ratio(times, "lorakit", "peft"),
                "<= 1.0x",
                "ms",
            )
            for figure, times, anchor in timed
        ),
        C.row(
            "base-model fingerprint (part of both figures above)",
            fingerprint * 1e3,
            None,
            "",
            None,
            "<= 20 ms",
            "ms",
        ),
        C.row(
            "adapter_model.safetensors size",
            sizes["lorakit"],
            sizes["peft"],
            "peft",
            None,
            "",
            "MiB",
        ),
    ]
