"""Generation shared by evaluation, the command line and the server: rows rendered into token ids
(``Formatter``, with the tokenizer's chat template) and greedy answers (``generate``), each row
with its own adapter where asked.

``Formatter`` renders a row (prompt/completion, a chat, or plain text) into token ids and loss
labels: the training data's encoding, and the prompt a model answers from. Labels are the ids with
every position not trained on set to ``IGNORE`` (-100, what ``cross_entropy`` skips).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import DataError
from .model import adapter_per_row

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One parsed line: its shape, where it came from, and its fields."""

    where: str  # "file:line"
    messages: tuple[dict[str, str], ...] = ()  # for "prompt" rows: the user and assistant turns
    text: str | None = None  # for "text" rows
    kind: str = "prompt"  # "prompt" | "messages" | "text"


@dataclass
class Encoded:
    """Token ids and labels of one training row (or several packed together)."""

    ids: list[int]
    labels: list[int]
    where: str
    truncated: bool = False
    prompt_ids: list[int] = field(default_factory=list)  # what generation starts from
    reference: str | None = None  # the expected answer, for exact match
    question: str | None = None  # the last user turn before it, for reports


class Formatter:
    """Renders examples with the tokenizer (and its chat template) into ids and loss masks.

    ``chat_template``: use the tokenizer's template where it has one (rows with ``messages`` need
    one). ``system_prompt``: a system turn put first in chat rows that have none of their own.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        chat_template: bool = True,
        system_prompt: str | None = None,
    ):
        if tokenizer is None:
            raise DataError(
                "the model has no tokenizer (its directory holds no tokenizer files); "
                "training, evaluation and generation need one: save the tokenizer beside it"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.system_prompt = system_prompt
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token to end completions with")

    def _render(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _tokens(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def pieces(self, ex: Example) -> list[tuple[list[int], bool]]:
        """The row as (token ids, trained?) pieces, in order."""
        eos = self.tokenizer.eos_token_id
        if ex.kind == "text":
            return [(self._tokens(ex.text, special=True) + [eos], True)]
        turns = list(ex.messages)
        if not self.use_template:
            if ex.kind == "messages":
                raise DataError(
                    f"{ex.where}: 'messages' rows need a chat template and the tokenizer has "
                    "none (or data.chat_template is false); use prompt/completion rows"
                )
            prompt, completion = turns[0]["content"], turns[1]["content"]
            completion_ids = self._tokens(completion) + [eos]  # a template ends turns itself
            return [(self._tokens(prompt, special=True), False), (completion_ids, True)]
        if self.system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        pieces, done = [], ""
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = self._render(turns[:i], generation_prompt=True)
            after = self._render(turns[: i + 1], generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(
                    f"{ex.where}: the chat template renders earlier turns differently once a "
                    "later turn follows, so the assistant tokens cannot be masked reliably"
                )
            pieces += [(self._tokens(before[len(done) :]), False)]
            pieces += [(self._tokens(after[len(before) :]), True)]
            done = after
        rest = self._render(turns, generation_prompt=False)[len(done) :]
        if rest:
            pieces.append((self._tokens(rest), False))
        return pieces

    def encode(self, ex: Example) -> Encoded:
        """Ids and labels of one example, truncated to ``max_length``."""
        ids: list[int] = []
        labels: list[int] = []
        for tokens, trained in self.pieces(ex):
            ids += tokens
            labels += tokens if trained else [IGNORE] * len(tokens)
        truncated = len(ids) > self.max_length
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(
                f"{ex.where}: nothing left to train on after truncation to data.max_length="
                f"{self.max_length} tokens (the prompt alone is that long)"
            )
        row = Encoded(ids, labels, ex.where, truncated)
        if ex.kind != "text":
            row.prompt_ids, row.reference = self.generation_prompt(ex)
            last = max(i for i, t in enumerate(ex.messages) if t["role"] == "assistant")
            users = [t["content"] for t in ex.messages[:last] if t["role"] == "user"]
            row.question = users[-1] if users else ""
        return row

    def generation_prompt(self, ex: Example) -> tuple[list[int], str]:
        """The ids a model answers from (everything before the last assistant turn) and the
        expected answer: the last assistant turn's text."""
        turns = list(ex.messages)
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        reference = turns[last]["content"]
        if not self.use_template:
            return self._tokens(turns[0]["content"], special=True), reference
        if self.system_prompt is not None and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.system_prompt})
            last += 1
        return self._tokens(self._render(turns[:last], generation_prompt=True)), reference

    def prompt_ids(self, text: str) -> list[int]:
        """The ids a model answers ``text`` from: a user turn (in the template) or ``text``."""
        turns = ({"role": "user", "content": text}, {"role": "assistant", "content": ""})
        return self.generation_prompt(Example("prompt", turns))[0]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 16,
    adapters: list[str | None] | None = None,
) -> list[str]:
    """Greedy answers (decoded, special tokens dropped, stripped) to prompts given as token ids.

    ``adapters``: the adapter that answers each prompt (``None``: the base model); the rows of one
    batch may use different adapters (:func:`lorakit.adapter_per_row`). Default: the active one.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    answers: dict[int, str] = {}
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: answers start at column `width`
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        per_row = contextlib.nullcontext()
        if adapters is not None:
            per_row = adapter_per_row(model, [adapters[i] for i in chunk])
        with per_row:
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return [answers[i] for i in range(len(prompts))]
