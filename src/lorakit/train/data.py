"""Training data: JSONL rows in three shapes, rendered and tokenized with loss masks.

One JSON object per line, in one of three shapes (a file may mix them):

* ``{"prompt": str, "completion": str}``: trained on the completion only;
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: a chat,
  trained on the assistant turns only;
* ``{"text": str}``: plain causal language modelling, trained on every token.

Other keys on a line (an ``id``, metadata) are allowed and ignored. Where the tokenizer has a chat
template, prompt/completion rows are rendered as a user turn and an assistant turn, so the model
sees the format it was instruction-tuned on. Labels are the input ids with every position that is
not trained on set to ``IGNORE`` (-100, the value ``torch.nn.functional.cross_entropy`` skips).

A line that cannot be used is an error naming ``file:line`` and the problem; all problems of a file
are gathered and raised once. Nothing is skipped silently: a row longer than ``max_length`` is
truncated and counted, and a row with nothing left to train on after truncation is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..generate import IGNORE, Encoded, Example, Formatter

ROLES = ("system", "user", "assistant")
MAX_LISTED = 20  # problems listed in one error; the rest are counted


# --------------------------------------------------------------------------------------------------
# Reading and checking lines


def read_jsonl(path: str | Path) -> list[Example]:
    """Every line of a JSONL file as an :class:`Example`; blank lines are errors too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples, problems = [], []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                examples.append(parse_line(decode_line(raw, where), where))
            except DataError as e:
                problems.append(str(e))
    if problems:
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(
            f"{path}: {len(problems)} bad line(s):\n" + "\n".join(f"  {p}" for p in shown) + tail
        )
    if not examples:
        raise DataError(f"{path}: the file has no rows")
    return examples


def decode_line(raw: bytes, where: str) -> str:
    """One line's bytes as text; invalid UTF-8 is a :class:`DataError` naming ``where``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        ) from None


def parse_line(line: str, where: str) -> Example:
    """One line as an :class:`Example`, or a :class:`DataError` naming ``where`` and the problem."""
    if not line.strip():
        raise DataError(f"{where}: empty line (expected one JSON object per line)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: bad JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Example(where, tuple(_messages(obj["messages"], where)), kind="messages")
    if "text" in obj:
        return Example(where, text=_string(obj, "text", where), kind="text")
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r}")
        prompt = _string(obj, "prompt", where, allow_empty=True)
        completion = _string(obj, "completion", where)
        turns = ({"role": "user", "content": prompt}, {"role": "assistant", "content": completion})
        return Example(where, turns, kind="prompt")
    keys = ", ".join(map(repr, obj)) or "none"
    raise DataError(
        f"{where}: expected the fields 'prompt' and 'completion', or 'messages', or 'text'; "
        f"found {keys}"
    )


def _string(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{at} must be an object with 'role' and 'content'")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: empty assistant turn")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(f"{where}: no assistant turn to train on")
    return turns


def encode_all(examples: list[Example], formatter: Formatter) -> tuple[list[Encoded], int]:
    """Encode every example; (rows, how many were truncated). Problems are gathered and raised
    once, like :func:`read_jsonl`'s."""
    rows, problems = [], []
    for ex in examples:
        try:
            rows.append(formatter.encode(ex))
        except DataError as e:
            problems.append(str(e))
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = len(problems) - MAX_LISTED
        raise DataError(
            f"{len(problems)} row(s) cannot be trained on:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return rows, sum(r.truncated for r in rows)


def pack(rows: list[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate whole rows, in order, into rows of at most ``max_length`` tokens.

    Fewer, fuller rows waste less compute on padding. The rows of one pack attend to each other
    (a causal mask over the concatenation), the usual trade-off of simple packing; labels keep
    their masks, so the loss is still on the trained tokens only.
    """
    packed: list[Encoded] = []
    for row in rows:
        last = packed[-1] if packed else None
        if last is not None and len(last.ids) + len(row.ids) <= max_length:
            last.ids = last.ids + row.ids
            last.labels = last.labels + row.labels
            last.where = last.where.split(" +")[0] + f" +{last.where.count('+') + 1}"
        else:
            packed.append(Encoded(list(row.ids), list(row.labels), row.where, row.truncated))
    return packed


def collate(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors (batch, seq)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class Batches:
    """An endless stream of training batches: every epoch a fresh permutation of the rows, drawn
    from ``seed`` and the epoch number alone, so a position ``(epoch, offset)`` says exactly which
    rows come next (what a checkpoint stores to resume the data where it stopped)."""

    def __init__(self, rows: list[Encoded], batch_size: int, seed: int):
        if not rows:
            raise DataError("no training rows")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next(self) -> list[Encoded]:
        batch = []
        while len(batch) < self.batch_size:
            if self.offset == len(self.rows):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.rows[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["rows"] != len(self.rows):
            raise DataError(
                f"the checkpoint was written for {state['rows']} training rows, the data now "
                f"has {len(self.rows)}: resume with the same data"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)
