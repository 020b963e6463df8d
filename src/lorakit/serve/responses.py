"""The JSON the server answers with, in OpenAI's shapes: whole responses, stream chunks and the
log-probabilities of each, for ``text_completion`` and ``chat.completion`` alike."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass
class Answer:
    """What one choice has said so far."""

    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Shape:
    """The response shape of one endpoint (``chat`` or not), for one request."""

    def __init__(self, chat: bool, model: str, logprobs: bool) -> None:
        self.chat = chat
        self.model = model
        self.logprobs = logprobs
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, entries: list[dict], offset: int = 0) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": e["token"],
                        "logprob": e["logprob"],
                        "bytes": list(e["token"].encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode())}
                            for t, lp in e["top"]
                        ],
                    }
                    for e in entries
                ]
            }
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries],
            "text_offset": offsets,
        }

    def whole(self, answers: list[Answer]) -> dict:
        choices = []
        for i, a in enumerate(answers):
            choice: dict = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": a.text}
            else:
                choice["text"] = a.text
            choice["logprobs"] = self._logprobs(a.logprobs)
            choice["finish_reason"] = a.finish_reason
            choices.append(choice)
        prompt = sum(a.prompt_tokens for a in answers[:: max(1, self.n_per_prompt)])
        completion = sum(a.completion_tokens for a in answers)
        return {**self._head(self.object), "choices": choices, "usage": usage(prompt, completion)}

    n_per_prompt = 1

    def chunk(
        self,
        index: int,
        text: str | None,
        logprobs: list[dict] | None = None,
        finish_reason: str | None = None,
        first: bool = False,
        offset: int = 0,
        with_usage: bool = False,
    ) -> dict:
        choice: dict = {"index": index}
        if self.chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = self._logprobs(logprobs, offset) if logprobs else None
        choice["finish_reason"] = finish_reason
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {**self._head(obj), "choices": [choice]}
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt, completion)}
