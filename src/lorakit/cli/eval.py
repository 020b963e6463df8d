"""``lorakit eval DATA.jsonl|CONFIG.yaml [--adapter DIR ...]``: held-out loss and exact match.

The rows of a JSONL file (any of the three shapes of ``lorakit train``) are scored by the base model
(with ``--base``, or when no adapter is given) and by each adapter: the loss per trained token, and
for rows with an answer the share that greedy generation gets exactly right. Given a training
config instead, its ``data.eval`` file, model and data settings are used, with ``section.key=value``
overrides as for ``lorakit train``. The data is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from .generate import add_model_arguments

EPILOG = """examples:
  lorakit eval examples/data/dates/held_out.jsonl --base --adapter runs/date_demo/adapter
  lorakit eval examples/date_demo.yaml --adapter runs/date_demo/adapter --samples 3
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="score the base model and adapters on held-out rows",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    parser.add_argument("data", metavar="DATA", help="a JSONL file, or a training config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 32")
    parser.add_argument("--max-length", type=int, default=None, help="default 512")
    parser.add_argument("--max-rows", type=int, default=None, help="score the first N rows")
    parser.add_argument("--samples", type=int, default=0, help="print N sample answers")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..generate import Formatter
    from ..model import disable_adapters, set_adapter
    from ..train.config import load_config
    from ..train.data import encode_all, read_jsonl
    from ..train.evaluate import evaluate
    from .generate import load_with_adapters

    data, model_source, max_new, max_length, system, template = args.data, None, 32, 512, None, True
    if Path(args.data).suffix in (".yaml", ".yml"):
        cfg = load_config(args.data, args.overrides)
        if cfg.data.eval is None:
            raise ConfigError(f"{args.data}: data.eval is not set: there is nothing to evaluate")
        data, model_source = cfg.data.eval, cfg.model.source
        max_new, max_length = cfg.evaluation.max_new_tokens, cfg.data.max_length
        system, template = cfg.data.system_prompt, cfg.data.chat_template
    elif args.overrides:
        raise ConfigError("section.key=value overrides need a training config, not a JSONL file")
    examples = read_jsonl(data)[: args.max_rows]  # checked before the model loads
    args.model = args.model or model_source
    model, tokenizer, answerers = load_with_adapters(args)
    formatter = Formatter(
        tokenizer,
        args.max_length or max_length,
        template and not args.no_chat_template,
        args.system_prompt if args.system_prompt is not None else system,
    )
    rows, truncated = encode_all(examples, formatter)
    print(f"{len(rows)} rows from {data}" + (f" ({truncated} truncated)" if truncated else ""))
    for name in answerers:
        if name is not None:
            set_adapter(model, name)
        base_only = name is None and len(answerers) > 1  # adapters loaded: switch them off
        with disable_adapters(model) if base_only else contextlib.nullcontext():
            result = evaluate(
                model,
                tokenizer,
                rows,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens or max_new,
                samples=args.samples,
            )
        print(f"[{name or 'base'}] {result.line()} ({result.seconds:.1f} s)")
        for s in result.samples:
            print(f"    {s['prompt']!r} -> {s['output']!r} (expected {s['reference']!r})")
    return 0
