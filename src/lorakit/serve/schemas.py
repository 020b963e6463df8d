"""The request bodies the server accepts, validated with pydantic (strict types, no unknown keys).

Field names and meanings are OpenAI's (``/v1/completions``, ``/v1/chat/completions``) and vLLM's
(``/v1/load_lora_adapter``, and the sampling parameters ``min_tokens`` and ``ignore_eos``). A
parameter the OpenAI API has but this server does not implement is accepted only at its no-op
value (``presence_penalty: 0``, ``echo: false``, ...), so a client that sends the defaults works;
any other value is refused, naming the parameter, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_STOPS = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20

#: parameters of the OpenAI API this server does not implement, and the value that means "off"
NO_OP = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "echo": (False, None),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "top_k": (None, -1, 0),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class Sampled(Strict):
    """What completions and chat share."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    top_k: int | None = None
    # vLLM's extra sampling parameters (a client sends them in ``extra_body``)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _no_op_only(self):
        for name, allowed in NO_OP.items():
            if name in self.model_fields_set and getattr(self, name, None) not in allowed:
                raise ValueError(f"parameter '{name}' is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("parameter 'stream_options' is only allowed with 'stream': true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(Sampled):
    prompt: (
        Annotated[str, Field(max_length=1_000_000)]
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict | None = None
    modalities: list | None = None
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("parameter 'top_logprobs' needs 'logprobs': true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("'max_tokens' and 'max_completion_tokens' disagree; give one")
        return self


class LoadAdapter(Strict):
    lora_name: Annotated[str, Field(min_length=1, max_length=255)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadAdapter(Strict):
    lora_name: Annotated[str, Field(min_length=1, max_length=255)]
    lora_int_id: int | None = None
