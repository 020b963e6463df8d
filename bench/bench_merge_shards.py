"""Merging into a sharded base: ``lorakit merge`` shard by shard against the loaded model.

A synthetic checkpoint is written shard by shard (never whole in memory): TinyLlama-1.1B's layer
shape (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary 32000) with ``LAYERS`` layers,
random bfloat16 weights, in shards of at most ``SHARD_BYTES``, with its index and config. The
adapter is r=16, alpha=32 on every linear layer of the blocks, in PEFT's layout, with the base
fingerprint a lorakit adapter carries.

Each merge runs as ``python -m lorakit merge`` in a fresh process, through a small parent that
reports the child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) and is timed
from the outside: once shard by shard (the default for a directory), once with ``--in-memory``
(``export_merged``: the model loaded in float32, merged, cast back, saved). The two outputs are
then compared tensor by tensor. Also measured: the same interpreter importing lorakit's CLI and
building the base's model on the meta device (what the shard-by-shard merge holds before it reads
a tensor), the floor under both peaks. Everything written is
deleted afterwards (about 3x the checkpoint's size on disk while it runs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "merge_shards"
TITLE = "Merging into a sharded base: lorakit merge shard by shard vs export_merged"
ANCHOR_PACKAGES = ["transformers", "safetensors"]
LAYERS = 20
SHARD_BYTES = 768 * 2**20
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    num_hidden_layers=LAYERS,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOOR = "import sys, lorakit.cli.main; from lorakit.models import meta_base; meta_base(sys.argv[1])"
PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)


def write_checkpoint(root: Path) -> list[int]:
    """The synthetic base in ``root``, one shard in memory at a time; returns the shard sizes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    root.mkdir()
    config.save_pretrained(root)
    gen = torch.Generator().manual_seed(0)
    groups, sizes, current = [], [], []
    for name, shape in shapes.items():
        size = shape.numel() * 2
        if current and sum(s for _, s in current) + size > SHARD_BYTES:
            groups.append(current)
            current = []
        current.append((name, size))
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, _ in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                values = torch.randn(shapes[name], generator=gen) * 0.02
                tensors[name] = values.to(torch.bfloat16)
        save_file(tensors, root / file, metadata={"format": "pt"})
        del tensors
        sizes.append((root / file).stat().st_size)
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
    total = sum(s for g in groups for _, s in g)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sizes


def write_adapter(root: Path, base: Path) -> None:
    """An r=16 adapter on every block linear layer, in PEFT's layout, with its fingerprint."""
    import torch
    from safetensors.torch import save_file

    from lorakit.io import fingerprint as fp
    from lorakit.io.shard_merge import fingerprint_from_files, read_checkpoint

    config, shards = read_checkpoint(base)
    owner = {name: shard for shard in shards for name in shard.entries}
    gen = torch.Generator().manual_seed(1)
    tensors, paths = {}, []
    for key in owner:
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and path.rsplit(".", 1)[-1] in TARGETS:
            out, inp = owner[key].entries[key]["shape"]
            paths.append(path)
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01
    record = fingerprint_from_files("LlamaForCausalLM", config, owner, paths)
    root.mkdir()
    metadata = {"format": "pt", fp.METADATA_KEY: fp.dumps(record)}
    save_file(tensors, root / "adapter_model.safetensors", metadata=metadata)
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": TARGETS,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(base),
    }
    (root / "adapter_config.json").write_text(json.dumps(peft, indent=2))


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak resident MiB of the command, its wall seconds), the command in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    kib, code = done.stdout.split()[-2:]
    if code != "0":
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout[-3000:]}")
    return int(kib) / 1024, seconds


def largest_difference(a: Path, b: Path) -> float:
    """The largest |a - b| over every tensor of two model directories, one tensor at a time."""
    from safetensors import safe_open

    where = {}
    for path in sorted(b.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    worst = 0.0
    for path in sorted(a.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                with safe_open(where.pop(key), framework="pt") as g:
                    x, y = f.get_tensor(key).float(), g.get_tensor(key).float()
                worst = max(worst, (x - y).abs().max().item())
    if where:
        raise RuntimeError(f"tensors only in {b}: {sorted(where)[:3]}")
    return worst


def run(threads: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="lorakit-bench-merge-"))
    try:
        sizes = write_checkpoint(root / "base")
        write_adapter(root / "adapter", root / "base")
        merge = [
            sys.executable,
            "-m",
            "lorakit",
            "merge",
            str(root / "base"),
            str(root / "adapter"),
        ]
        shard_mib, shard_s = peak_rss([*merge, str(root / "by-shard")])
        loaded_mib, loaded_s = peak_rss([*merge, str(root / "loaded"), "--in-memory"])
        floor = FLOOR
        floor_mib, _ = peak_rss([sys.executable, "-c", floor, str(root / "base")])
        difference = largest_difference(root / "by-shard", root / "loaded")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    largest = max(sizes) / 2**20
    total = sum(sizes) / 2**20
    loaded = "export_merged (model loaded)"
    return [
        {
            "figure": f"checkpoint: {SHAPE['num_hidden_layers']} layers, {len(sizes)} shards, "
            f"{total:.0f} MiB (largest shard {largest:.0f} MiB), bfloat16",
            "lorakit": round(total),
            "anchor": None,
            "anchor_name": "",
            "ratio": None,
            "goal": "",
            "unit": "MiB",
        },
        {
            "figure": "peak resident memory of lorakit merge",
            "lorakit": round(shard_mib),
            "anchor": round(loaded_mib),
            "anchor_name": loaded,
            "ratio": None,
            "goal": "",
            "unit": "MiB",
        },
        {
            "figure": "peak resident memory / largest shard",
            "lorakit": round(shard_mib / largest, 2),
            "anchor": round(loaded_mib / largest, 2),
            "anchor_name": loaded,
            "ratio": None,
            "goal": "<= 1.5",
            "unit": "x",
        },
        {
            "figure": "of which the interpreter, its imports and the base's meta model",
            "lorakit": round(floor_mib),
            "anchor": round(floor_mib),
            "anchor_name": loaded,
            "ratio": None,
            "goal": "",
            "unit": "MiB",
        },
        {
            "figure": "wall time of lorakit merge (process start to exit)",
            "lorakit": round(shard_s, 1),
            "anchor": round(loaded_s, 1),
            "anchor_name": loaded,
            "ratio": None,
            "goal": "",
            "unit": "s",
        },
        {
            "figure": "largest difference between the two merged checkpoints",
            "lorakit": difference,
            "anchor": None,
            "anchor_name": loaded,
            "ratio": None,
            "goal": "",
            "unit": "",
        },
    ]
