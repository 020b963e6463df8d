"""``lorakit serve [BASE] --adapters DIR``: an OpenAI-compatible server for a base and its adapters.

Every adapter directory under DIR is served under its directory's name, a run's ``adapter/`` under
the run's name (``runs/date_demo/adapter`` as ``date_demo``); ``--adapter NAME=PATH`` adds one. The
request's ``model`` field picks the adapter; the base answers under its own name. Requests on
different adapters share every decoding step (continuous batching over mixed-adapter rows).
Adapters load on first use; past ``--max-loras`` the least recently used idle one is evicted.
``--max-lora-memory SIZE`` (``512MiB``, ``2GB``, or bytes) also bounds the bytes of the adapters in
memory (their tensors on the model's device): least recently used idle adapters are evicted before
a load until it fits; a request waits while the budget is held by adapters in use, and an adapter
larger than the whole budget fails its requests (422, naming its size and the budget).
Needs the ``serve`` extra (``pip install 'lorakit[serve]'``).
"""

from __future__ import annotations

import argparse
import re

#: ``--max-lora-memory`` units: decimal (kB, MB, GB, TB) and binary (KiB, MiB, GiB, TiB)
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

EPILOG = """examples:
  lorakit serve --adapters runs/
  curl http://127.0.0.1:8000/v1/models
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "date_demo", "messages": [{"role": "user", "content": "..."}]}'
"""


def _pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def size_bytes(text: str) -> int:
    """``512MiB`` -> 536870912; bytes, or a number with a decimal or binary unit; above zero."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"the size must be positive, got {text!r}")
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if unit not in UNITS:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512MiB, 2GB or a number of bytes, got {text!r} "
            "(units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    size = int(float(match.group(1)) * UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"the size must be at least 1 byte, got {text!r}")
    return size


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve the base model and adapters over an OpenAI-compatible HTTP API",
        description=__doc__,
        epilog=EPILOG,
    )
    add = parser.add_argument
    add(
        "base",
        nargs="?",
        default=None,
        metavar="BASE",
        help="a transformers directory or .gguf file (default: the embedded model)",
    )
    add("--adapters", metavar="DIR", help="serve every adapter directory under DIR")
    add(
        "--adapter",
        action="append",
        type=_pair,
        default=[],
        metavar="NAME=PATH",
        help="serve the adapter at PATH as NAME (repeatable)",
    )
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--port", type=int, default=8000)
    add("--quantize", choices=["nf4", "fp4"], help="serve a 4-bit base (adapters unmerged on it)")
    add("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    add("--served-model-name", help="the base's name in requests (default: its name or path)")
    add("--api-key", help="key for the inference endpoints (or LORAKIT_API_KEY)")
    add("--admin-key", help="key for loading/unloading adapters at run time (or LORAKIT_ADMIN_KEY)")
    add("--max-loras", type=int, default=8, help="adapters kept in memory (default 8)")
    add(
        "--max-lora-memory",
        type=size_bytes,
        default=None,
        metavar="SIZE",
        help="bytes of adapters kept in memory, e.g. 512MiB or 2GB (default: no byte limit; "
        "--max-loras applies as well)",
    )
    add("--max-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    add("--max-waiting", type=int, default=256, help="queued requests before 503 (default 256)")
    add("--max-prompt-tokens", type=int, default=2048)
    add(
        "--max-prefill-tokens",
        type=int,
        default=2048,
        help="prompt tokens (padded) prefilled together in one forward (default 2048)",
    )
    add("--max-tokens", type=int, default=1024, help="the most a request may ask to generate")
    add("--default-max-tokens", type=int, default=256, help="when a request does not say")
    add("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    add("--allow-bin", action="store_true", help="read legacy adapter_model.bin files")
    add("--grace", type=float, default=10.0, help="seconds running requests get on Ctrl-C")
    add("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..train.requirements import require

    for flag in (
        "max_loras",
        "max_seqs",
        "max_waiting",
        "max_prompt_tokens",
        "max_prefill_tokens",
        "max_tokens",
        "default_max_tokens",
        "max_body_bytes",
    ):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    require({m: "lorakit serve" for m in ("fastapi", "uvicorn", "pydantic", "transformers")})
    from ..serve.server import Options
    from ..serve.server import run as serve

    options = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    options.adapter = dict(args.adapter)
    return serve(options)
