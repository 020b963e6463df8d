"""Describe an adapter directory, or what a config would add to a base model.

    lorakit inspect ADAPTER_DIR [--json]
    lorakit inspect BASE [--r 16] [--alpha 32] [--target q_proj v_proj] [--json]

For an adapter directory: its config, the adapted modules with ranks and shapes, the parameter
count, the file size and the base model's fingerprint (read from the files; no model is loaded).
For a base model (a transformers directory, a .gguf file or "default"): the plan of the given
config, module by module, built on the meta device (no weights are loaded).
"""

from __future__ import annotations

import argparse

HELP = "describe an adapter directory, or the plan of a config for a base model"

_PLAN_OPTIONS = ("r", "alpha", "target", "target_regex", "exclude", "modules_to_save", "rslora")
# The LoraConfig fields the plan options set, as errors name them, and the flags that set them
# (target_modules: --target or --target-regex, whichever is given).
KEYWORDS = {
    "r": "--r",
    "alpha": "--alpha",
    "exclude_modules": "--exclude",
    "modules_to_save": "--modules-to-save",
    "use_rslora": "--rslora",
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect",
        help=HELP,
        description=__doc__,
    )
    parser.set_defaults(run=run)
    parser.add_argument("path", metavar="PATH", help='adapter directory, base model or "default"')
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--allow-bin",
        action="store_true",
        help="read a legacy adapter_model.bin (torch.load with weights_only=True)",
    )
    plan = parser.add_argument_group("plan options (for a base model)")
    plan.add_argument("--r", type=int, default=None, help="rank (default 8)")
    plan.add_argument("--alpha", type=float, default=None, help="alpha (default 16)")
    plan.add_argument(
        "--target", nargs="+", default=None, help='module names, or "all-linear" (the default)'
    )
    plan.add_argument("--target-regex", default=None, help="a regex over the whole module path")
    plan.add_argument("--exclude", nargs="+", default=None, help="module names left alone")
    plan.add_argument("--modules-to-save", nargs="+", default=None, help="modules trained fully")
    plan.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    return parser


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import ConfigError

    path = Path(args.path)
    if (path / "adapter_config.json").is_file():
        given = [f"--{o.replace('_', '-')}" for o in _PLAN_OPTIONS if getattr(args, o) is not None]
        if given:
            raise ConfigError(
                f"{' '.join(given)}: plan options apply to a base model, not to an adapter"
            )
        from ..io.inspect import format_adapter, inspect_adapter

        info = inspect_adapter(path, allow_bin=args.allow_bin)
        print(json.dumps(info, indent=2) if args.json else format_adapter(info))
        return 0

    from ..config import LoraConfig
    from ..models import meta_base
    from ..targeting import plan

    if args.target is not None and args.target_regex is not None:
        raise ConfigError("--target and --target-regex: give one of them")
    # errors about the config built from the plan options name those options (see main.with_flags)
    args.keywords = {
        **KEYWORDS,
        "target_modules": "--target-regex" if args.target_regex else "--target",
    }
    fields = {"r": args.r, "alpha": args.alpha, "use_rslora": args.rslora}
    fields["target_modules"] = args.target_regex or (
        args.target[0] if args.target == ["all-linear"] else args.target
    )
    fields["exclude_modules"] = args.exclude
    fields["modules_to_save"] = args.modules_to_save
    config = LoraConfig(**{k: v for k, v in fields.items() if v is not None})
    model = meta_base(None if args.path == "default" else args.path)
    result = plan(model, config)
    if args.json:
        print(
            json.dumps(
                {"model": type(model).__name__, "config": config.to_dict(), **result.to_dict()},
                indent=2,
            )
        )
    else:
        print(
            f"{type(model).__name__} from {args.path}: r={config.r}, alpha={config.alpha:g}, "
            f"targets {config.target_modules}\n"
        )
        print(result)
    return 0
