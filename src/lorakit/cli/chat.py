"""``lorakit chat [--adapter DIR ...]``: talk to the base model or an adapted one, turn by turn.

Each line typed (or piped in) is a user turn; the model answers greedily with the whole
conversation so far in its chat template. With several ``--adapter`` the model answers with all of
them applied together: their updates are added (``lorakit.combine(..., method="cat")``, exact).
An empty line or end of input ends the chat; ``/reset`` starts a new conversation. Without a chat
template (or with ``--no-chat-template``) the turns so far are sent as plain lines.
"""

from __future__ import annotations

import argparse
import sys

from .generate import add_model_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat",
        help="a conversation with the base model or adapters, turn by turn",
        description=__doc__.split("\n\n")[0],
    )
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..combine import combine
    from ..generate import Example, Formatter, generate
    from ..model import set_adapter
    from .generate import load_with_adapters

    args.base = False
    model, tokenizer, names = load_with_adapters(args)
    if len(names) > 1:
        set_adapter(model, combine(model, dict.fromkeys(names, 1.0), method="cat", name="chat"))
    formatter = Formatter(tokenizer, 10**9, not args.no_chat_template, args.system_prompt)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        if formatter.use_template:
            turns = (*history, {"role": "assistant", "content": ""})
            prompt, _ = formatter.generation_prompt(Example("chat", turns, kind="messages"))
        else:  # no template: the conversation so far as plain lines, the model continues it
            prompt = formatter.prompt_ids("\n".join(t["content"] for t in history) + "\n")
        answer = generate(model, tokenizer, [prompt], args.max_new_tokens)[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}" if interactive else answer, flush=True)
