"""Export an adapter for llama.cpp and ollama: a GGUF LoRA adapter, or the merged GGUF model.

    lorakit export-gguf ADAPTER OUT.gguf [--base BASE]
    lorakit export-gguf --merged [BASE] ADAPTER OUT.gguf [--outtype f16]

The adapter file is applied by llama.cpp to the base's own GGUF (llama-cli -m BASE.gguf --lora
OUT.gguf) and by ollama (a Modelfile with FROM BASE and ADAPTER ./OUT.gguf). Each module's exact
scale is folded into its B, so rsLoRA adapters and adapters with rank_pattern / alpha_pattern
(those lorakit combine writes) compute what they compute in lorakit. BASE, a transformers
directory or a .gguf file, gives the architecture, sizes and tensor names (no weights are read
for an adapter); without it, the base the adapter records is used (a path, or the embedded model).

--merged writes the base with the adapter merged in as one GGUF model (f32, f16, bf16 or q8_0):
from a .gguf base every tensor and metadata key (tokenizer, chat template) is kept; from a
transformers directory the model is converted as llama.cpp's converter does (byte-level BPE
tokenizers only). DoRA adapters, modules_to_save copies and trained biases, which a GGUF adapter
cannot hold, export this way. Llama-family models: Llama, SmolLM2, Mistral, Qwen2.
"""

from __future__ import annotations

import argparse

HELP = "write an adapter (or the merged model) as a GGUF file for llama.cpp and ollama"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-gguf",
        help=HELP,
        usage="%(prog)s [options] [BASE] ADAPTER OUT.gguf",
        description=__doc__,
    )
    parser.set_defaults(run=run)
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="[BASE] ADAPTER OUT.gguf",
        help="the adapter directory and the file to write; with --merged, the base first",
    )
    parser.add_argument("--base", default=None, help="the base model: a directory or a .gguf")
    parser.add_argument(
        "--merged", action="store_true", help="write the merged model instead of an adapter"
    )
    parser.add_argument(
        "--outtype",
        default=None,
        choices=("f32", "f16", "bf16", "q8_0"),
        help="tensor type (default: f32 for an adapter, f16 for a merged model)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="export even if the adapter's fingerprint names another base model",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    import time

    from ..errors import ConfigError
    from ..io.gguf_export import export_gguf

    args.keywords = {"out_type": "--outtype", "base": "--base"}
    paths = list(args.paths)
    if args.merged and len(paths) == 3:
        if args.base is not None:
            raise ConfigError("the base is given twice: as BASE and as --base")
        args.base = paths.pop(0)
    if len(paths) != 2:
        expected = "[BASE] ADAPTER OUT.gguf" if args.merged else "ADAPTER OUT.gguf"
        raise ConfigError(f"expected {expected}, got {len(args.paths)} path(s)")
    adapter, out = paths
    start = time.perf_counter()
    target = export_gguf(
        adapter,
        out,
        base=args.base,
        merged=args.merged,
        out_type=args.outtype,
        overwrite=args.overwrite,
        allow_base_mismatch=args.allow_base_mismatch,
    )
    print(describe(target, time.perf_counter() - start))
    return 0


def describe(path, seconds: float) -> str:
    """One line on the file written: what it is, its architecture, tensors and size."""
    from ..io.gguf_read import read_gguf

    file = read_gguf(path)
    arch = file.value("general.architecture")
    size = path.stat().st_size / 2**20
    if "adapter.lora.alpha" in file.fields:
        alpha = file.value("adapter.lora.alpha")
        what = f"llama.cpp LoRA adapter ({arch}, {len(file.tensors) // 2} tensor pairs, "
        what += f"alpha {alpha:g})"
    else:
        what = f"merged {arch} model ({len(file.tensors)} tensors)"
    return f"wrote {path}: {what}, {size:.2f} MiB in {seconds:.1f} s"
