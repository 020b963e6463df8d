"""``lorakit generate [--adapter DIR ...] PROMPT ...``: answer prompts greedily, with adapters.

Each prompt is sent as a user turn through the tokenizer's chat template (``--no-chat-template``
sends it as it is) and answered by every adapter given, and by the base model with ``--base`` or
when no adapter is given. Several adapters answer in the same batches: each row of a batch uses its
own adapter (``lorakit.adapter_per_row``), so one pass over the frozen base serves them all.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

EPILOG = """examples:
  lorakit generate --base --adapter runs/date_demo/adapter \\
      "Convert to ISO date (YYYY-MM-DD): 5 Mar 1987"
  lorakit generate --adapter runs/a/adapter --adapter runs/b/adapter - < prompts.txt
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``generate`` and ``eval`` share: base model, adapters, prompt format."""
    parser.add_argument(
        "--model",
        default=None,
        help="a transformers directory or .gguf file (default: the base the adapters record, "
        "else the embedded model)",
    )
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="DIR", help="an adapter (repeatable)"
    )
    parser.add_argument("--base", action="store_true", help="also answer with the base model")
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load adapters even if their fingerprint names another base model",
    )
    parser.add_argument(
        "--allow-bin",
        action="store_true",
        help="read a legacy adapter_model.bin (torch.load with weights_only=True)",
    )
    parser.add_argument("--system-prompt", default=None, help="a system turn put first")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="send prompts without the chat template"
    )
    parser.add_argument("--batch-size", type=int, default=16)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="answer prompts with the base model and adapters",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    parser.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help="prompts ('-': one per line of stdin)"
    )
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.set_defaults(run=run)
    return parser


def adapter_names(dirs: list[str]) -> list[str]:
    """Short unique names for adapter directories (``runs/x/adapter`` is called ``x``)."""
    names: list[str] = []
    for d in dirs:
        path = Path(d)
        stem = path.parent.name if path.name == "adapter" and path.parent.name else path.name
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", stem).lstrip("-") or "adapter"
        unique, n = name, 2
        while unique in names or unique == "base":
            unique, n = f"{name}-{n}", n + 1
        names.append(unique)
    return names


def load_with_adapters(args: argparse.Namespace):
    """(model, tokenizer, answerers): the base with every ``--adapter`` loaded, and the names that
    answer (``None`` stands for the base model)."""
    from ..io import load_adapter
    from ..models import load_model

    model, tokenizer = load_model(args.model or recorded_base(args.adapter))
    names = adapter_names(args.adapter)
    for directory, name in zip(args.adapter, names):
        model = load_adapter(
            model,
            directory,
            adapter_name=name,
            allow_base_mismatch=args.allow_base_mismatch,
            allow_bin=args.allow_bin,
        )
    answerers: list[str | None] = list(names)
    if args.base or not names:
        answerers.insert(0, None)
    model.eval()
    return model, tokenizer, answerers


def recorded_base(adapters: list[str]) -> str | None:
    """The base model the adapters record (None: the embedded model); all must record the same."""
    from ..errors import ConfigError
    from ..io.base_models import adapter_base

    hint = "pass the base model explicitly with --model"
    bases = {d: adapter_base(d, hint) for d in adapters}
    if len(set(bases.values())) > 1:
        listed = ", ".join(f"{d}: {b or 'the embedded model'}" for d, b in bases.items())
        raise ConfigError(f"the adapters record different base models ({listed}); {hint}")
    return next(iter(bases.values()), None)


def run(args: argparse.Namespace) -> int:
    from ..generate import Formatter, generate

    prompts = [
        p
        for item in args.prompts
        for p in (sys.stdin.read().splitlines() if item == "-" else [item])
    ]
    prompts = [p for p in prompts if p.strip()]
    model, tokenizer, answerers = load_with_adapters(args)
    formatter = Formatter(tokenizer, 10**9, not args.no_chat_template, args.system_prompt)
    rows = [(p, name) for p in prompts for name in answerers]
    answers = generate(
        model,
        tokenizer,
        [formatter.prompt_ids(p) for p, _ in rows],
        args.max_new_tokens,
        args.batch_size,
        adapters=[name for _, name in rows] if len(answerers) > 1 else None,
    )
    width = max(len(name or "base") for name in answerers) + 2
    for i, prompt in enumerate(prompts):
        print(f"> {prompt}")
        for j, name in enumerate(answerers):
            label = f"[{name or 'base'}]"
            print(f"  {label:<{width}} {answers[i * len(answerers) + j]}")
    return 0
