"""``lorakit train [config.yaml] [section.key=value ...]``: fine-tune a model from a YAML config.

The config (see :mod:`lorakit.train.config`) is read, overridden and validated before anything is
loaded, so a typo fails in a fraction of a second with every problem listed. ``--print-config``
prints the resolved config and stops. The run writes its adapter, checkpoints, ``metrics.jsonl``,
``loss.png`` and ``report.md`` to ``output.dir`` and ends by printing the held-out evaluation
before and after training. A config with ``adapters:`` trains them all in one run
(:mod:`lorakit.train.multi`) and ends by printing their table (``summary.md``).
"""

from __future__ import annotations

import argparse
import os
import sys

SAMPLES = 4  # held-out answers printed at the end (report.md has evaluation.samples of them)

EPILOG = """examples:
  lorakit train examples/date_demo.yaml
  lorakit train examples/date_demo.yaml training.steps=60 output.dir=runs/short
  lorakit train examples/date_demo.yaml training.resume=true    # continue after an interruption
  lorakit train data.train=my.jsonl data.eval=held_out.jsonl lora.r=8 --print-config
  lorakit train customers.yaml adapters.acme.lora.r=4   # a config with adapters: (many in one run)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model with LoRA, QLoRA or fully, from a YAML config",
        usage="%(prog)s [options] [CONFIG.yaml] [section.key=value ...]",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG.yaml] [section.key=value ...]",
        help="a YAML config file (optional; lorakit init writes one) and dotted overrides, "
        "e.g. training.lr=1e-3",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.set_defaults(run=run)
    return parser


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides): the first item is the config unless it has an ``=``."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, list(items)


def run(args: argparse.Namespace) -> int:
    from ..train import load_config, train

    path, overrides = split_items(args.items)
    config = load_config(path, overrides)  # everything is checked here, before any weight loads
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    result = train(config)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # a torchrun worker
        if os.environ.get("RANK", "0") == "0":  # rank 0 alone reports
            report(config, result)
        leave(0)
    return report(config, result)


def leave(code: int) -> None:
    """End a torchrun worker whose run has finished (every file written and synced, the process
    group left) without the interpreter's teardown: torch's distributed threads have been seen
    to abort a worker there ("terminate called without an active exception"), which would turn
    a finished run into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def report(config, result) -> int:
    """Print what the run learned (rank 0, or one process)."""
    print()
    if config.adapters:  # many adapters in one run: their table
        summary = result.out_dir / "summary.md"
        if summary.is_file():
            print(summary.read_text(encoding="utf-8"))
        for name, one in result.adapters.items():
            for warning in one.warnings:
                print(f"warning: {name}: {warning}")
        print(f"wrote {result.out_dir / 'adapters'}/NAME/adapter for {', '.join(result.adapters)}")
        return 0
    if result.after is not None and result.after.samples:
        before = {x["where"]: x["output"] for x in (result.before.samples if result.before else [])}
        print("held-out answers after training (expected; before training):")
        for x in result.after.samples[:SAMPLES]:
            was = before.get(x["where"], "-")
            print(f"  {x['prompt']} -> {x['output']!r} ({x['reference']}; {was[:24]!r})")
    if result.before is not None:
        print(f"before training: {result.before.line()}")
    if result.after is not None:
        print(f"after training:  {result.after.line()}")
    done = result.last_step - result.start_step
    print(f"{done} steps in {result.train_seconds:.1f} s; saved {result.saved}")
    if result.kept_step != result.last_step:
        print(
            f"saved the parameters of step {result.kept_step} (lowest held-out loss "
            f"{result.kept_loss:.4f}), not the last step's ({result.last_step})"
        )
    for warning in result.warnings:
        print(f"warning: {warning}")
    files = [result.out_dir / n for n in ("report.md", "summary.json", "metrics.jsonl", "loss.png")]
    print("wrote " + ", ".join(str(f) for f in files if f.exists()))
    return 0
