"""Merge an adapter into its base model and write a plain transformers model directory.

    lorakit merge BASE ADAPTER OUT
    lorakit merge ADAPTER OUT            (BASE omitted: the base the adapter records)

BASE is a transformers model directory, a .gguf file or "default" (the embedded model). Without
BASE, the adapter's base_model_name_or_path is used: a directory or .gguf file, the embedded
model's id, or a hub id found in the local Hugging Face cache (nothing is downloaded).

OUT receives safetensors shards, config.json and the tokenizer files; transformers'
from_pretrained loads it without lorakit, and its outputs equal the base with the adapter.

A BASE directory of safetensors files (model.safetensors, or shards and their index) is merged
shard by shard from the files, without loading the model: the memory held is about one adapted
weight plus the adapter, so a base larger than memory merges too. The shards keep the base's
split and each tensor its stored dtype (--dtype casts them; --max-shard-size does not apply).
--in-memory loads the model instead (any other BASE is always loaded).
"""

from __future__ import annotations

import argparse

HELP = "merge an adapter into its base model and write a transformers model directory"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge",
        help=HELP,
        usage="%(prog)s [options] [BASE] ADAPTER OUT",
        description=__doc__,
    )
    parser.set_defaults(run=run)
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="[BASE] ADAPTER OUT",
        help="two or three paths: the base model (optional), the adapter, the output directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a model")
    parser.add_argument(
        "--dtype", default=None, help="dtype of the written weights (default: the base's own)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="2GB",
        help="largest shard when the model is loaded (default: 2GB)",
    )
    parser.add_argument(
        "--in-memory",
        action="store_true",
        help="load the base model and merge it in memory, even for a safetensors directory",
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="merge even if the adapter's fingerprint names another base model",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from ..errors import ConfigError
    from ..io.base_models import adapter_base
    from ..io.export import export_merged
    from ..io.shard_merge import is_sharded_base, merge_shards

    if len(args.paths) not in (2, 3):
        raise ConfigError(f"expected [BASE] ADAPTER OUT, got {len(args.paths)} path(s)")
    base, adapter, out = (None, *args.paths) if len(args.paths) == 2 else args.paths
    if len(args.paths) == 2:
        base = adapter_base(
            adapter, "pass the base model explicitly: lorakit merge BASE ADAPTER OUT"
        )
    start = time.perf_counter()
    options = dict(
        dtype=args.dtype, overwrite=args.overwrite, allow_base_mismatch=args.allow_base_mismatch
    )
    by_shard = not args.in_memory and is_sharded_base(base)
    if by_shard:
        target = merge_shards(base, adapter, out, **options)
    else:
        target = export_merged(base, adapter, out, max_shard_size=args.max_shard_size, **options)
    files = sorted(p for p in Path(target).iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files) / 2**20
    print(
        f"merged {adapter} into {base or 'default'}: {target} ({len(files)} files, "
        f"{size:.1f} MiB) in {time.perf_counter() - start:.1f} s"
        + (", shard by shard" if by_shard else ", in memory")
    )
    return 0
