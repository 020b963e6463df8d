"""The HTTP side: FastAPI routes over the engine, in OpenAI's and vLLM's conventions.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET
/health``, ``GET /metrics`` (Prometheus text), ``POST /v1/load_lora_adapter`` and ``POST
/v1/unload_lora_adapter`` (admin key), ``GET /`` (the playground page). Every error is OpenAI's
error object ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for anything a
client sent; a fault of the server's own is a 500 whose body says only that (the traceback goes
to the server's log).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LorakitError
from ..generate import Example, Formatter
from ..sampling import Sampling
from .engine import Busy, Engine
from .engine import Request as EngineRequest
from .http_errors import (
    ApiError,
    BodyLimit,
    check_key,
    error_body,
    error_response,
    validation_message,
)
from .metrics import render_metrics
from .responses import Answer, Shape
from .schemas import ChatRequest, CompletionRequest, LoadAdapter, UnloadAdapter
from .store import UnknownModel

log = logging.getLogger("lorakit.serve")
PAGE = Path(__file__).with_name("playground.html")


@dataclass
class Settings:
    """The server's limits and keys (see ``lorakit serve --help``)."""

    base_name: str
    api_key: str | None = None
    admin_key: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    context_length: int | None = None


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    store = engine.store

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(ApiError(400, message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, ApiError):  # raised while the body was read (BodyLimit)
            return error_response(exc.__cause__)
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, "internal server error (see the server's log)"))

    def available() -> str:
        return ", ".join([settings.base_name] + store.names())

    def resolve(name: str):
        """(adapter name or None, store entry or None, tokenizer)."""
        if name == settings.base_name:
            return None, None, engine.tokenizer
        try:
            entry = store.get(name, available())
        except UnknownModel as exc:
            raise ApiError(404, str(exc), "model") from None
        return entry.name, entry, entry.tokenizer or tokenizer_for(entry)

    def tokenizer_for(entry) -> Any:
        if not store.tokenizer_files(entry.path):
            return engine.tokenizer
        from transformers import AutoTokenizer

        try:  # read once; the engine's load and later requests reuse it
            entry.tokenizer = AutoTokenizer.from_pretrained(str(entry.path))
            return entry.tokenizer
        except Exception as exc:  # noqa: BLE001 - a bad tokenizer file is the adapter's error
            message = f"adapter {entry.name!r}: its tokenizer cannot be read: {exc}"
            raise ApiError(422, message) from None

    def max_tokens(body) -> int:
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > settings.max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' is {asked}; this server allows at most {settings.max_tokens}",
                "max_tokens",
            )
        return asked or settings.default_max_tokens

    def check_prompt(ids: list[int], tokens: int, vocab: int) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(ids) > settings.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server allows at most "
                f"{settings.max_prompt_tokens}",
                "prompt",
            )
        if max(ids) >= vocab:
            raise ApiError(
                400, f"token id {max(ids)} is outside the vocabulary ({vocab})", "prompt"
            )
        limit = settings.context_length
        if limit is not None and len(ids) + tokens > limit:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({tokens}) is more than the "
                f"model's context length ({limit})",
                "max_tokens",
            )

    def sampling(body, top_logprobs: int | None) -> Sampling:
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return Sampling(temperature, top_p, body.seed, top_logprobs)

    async def run(request: Request, body, chat: bool):
        check_key(request, settings.api_key, "API key")
        adapter, entry, tokenizer = await asyncio.to_thread(resolve, body.model)
        vocab = engine.model.get_input_embeddings().weight.shape[0]
        tokens = max_tokens(body)
        if chat:
            prompts = [chat_ids(tokenizer, body)]
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts = completion_ids(tokenizer, body.prompt)
            top = body.logprobs
        for ids in prompts:
            check_prompt(ids, tokens, vocab)
        if body.min_tokens > tokens:
            raise ApiError(
                400,
                f"'min_tokens' is {body.min_tokens}, more than max_tokens ({tokens})",
                "min_tokens",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        job = EngineRequest(
            id="",
            model=body.model,
            adapter=adapter,
            prompts=prompts,
            n=body.n,
            max_tokens=tokens,
            sampling=sampling(body, top),
            stops=body.stops,
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
            emit=emit,
            tokenizer=tokenizer,
            entry=entry,
        )
        shape = Shape(chat, body.model, top is not None)
        shape.n_per_prompt = body.n
        try:
            engine.submit(job)
        except Busy as exc:
            raise ApiError(503, str(exc), **{"Retry-After": "1"}) from None
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream(job, queue, shape, include),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await whole(request, job, queue, shape)

    async def watch(request: Request, job) -> None:
        """Cancel ``job`` when its client goes away (the body is read: what comes next on the
        connection is its end)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancelled.set()
                return

    async def whole(request: Request, job, queue, shape: Shape):
        answers = [Answer() for _ in range(job.choices)]
        done = 0
        watcher = asyncio.create_task(watch(request, job))
        try:
            while done < job.choices:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                if job.cancelled.is_set():  # nobody is left to answer
                    return JSONResponse(error_body(400, "the client disconnected"), 400)
                if event is None:
                    continue
                if event["kind"] == "error":
                    raise ApiError(event["status"], event["message"])
                answer = answers[event["index"]]
                if event["kind"] == "delta":
                    answer.text += event["text"]
                    if "logprob" in event:
                        answer.logprobs.append(event["logprob"])
                else:
                    answer.finish_reason = event["finish_reason"]
                    answer.prompt_tokens = event["prompt_tokens"]
                    answer.completion_tokens = event["completion_tokens"]
                    done += 1
        finally:
            watcher.cancel()
            job.cancelled.set()  # a no-op when every choice is done
        return JSONResponse(shape.whole(answers))

    async def stream(job, queue, shape: Shape, include_usage: bool):
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        done, prompt, completion = 0, {}, 0
        offsets = [0] * job.choices
        try:
            if shape.chat:  # the role first, as OpenAI sends it
                for i in range(job.choices):
                    yield sse(shape.chunk(i, "", first=True, with_usage=include_usage))
            while done < job.choices:
                event = await queue.get()
                if event["kind"] == "error":
                    yield sse(error_body(event["status"], event["message"]))
                    break
                i = event["index"]
                if event["kind"] == "delta":
                    lp = [event["logprob"]] if "logprob" in event else None
                    yield sse(
                        shape.chunk(
                            i, event["text"], lp, offset=offsets[i], with_usage=include_usage
                        )
                    )
                    offsets[i] += len(event["text"])
                else:
                    done += 1
                    prompt[i // job.n] = event["prompt_tokens"]
                    completion += event["completion_tokens"]
                    text = None if shape.chat else ""
                    yield sse(
                        shape.chunk(
                            i, text, finish_reason=event["finish_reason"], with_usage=include_usage
                        )
                    )
            else:
                if include_usage:
                    yield sse(shape.usage_chunk(sum(prompt.values()), completion))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a closed stream frees its rows at the next step

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await run(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await run(request, body, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, settings.api_key, "API key")
        base = {"id": settings.base_name, "object": "model", "created": 0, "owned_by": "lorakit"}
        data = [{**base, "root": settings.base_name, "parent": None}]
        for name in store.names():
            entry = store.entries.get(name)
            root = str(entry.path) if entry else name
            data.append({**base, "id": name, "root": root, "parent": settings.base_name})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if engine.stopping:
            return JSONResponse({"status": "shutting down"}, 503)
        if not engine.thread.is_alive():
            return JSONResponse({"status": "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        check_key(request, settings.api_key, "API key")
        return PlainTextResponse(render_metrics(engine), media_type="text/plain; version=0.0.4")

    def check_admin(request: Request) -> None:
        if settings.admin_key is None:
            raise ApiError(
                403, "loading adapters at run time is off: start the server with --admin-key"
            )
        check_key(request, settings.admin_key, "admin key")

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request, body: LoadAdapter):
        check_admin(request)
        if body.lora_name == settings.base_name:
            raise ApiError(400, f"{body.lora_name!r} is the base model's name", "lora_name")
        try:
            entry = store.add(body.lora_name, Path(body.lora_path))
        except LorakitError as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        engine.wake()
        engine.start_load_of(entry)
        while entry.state == "loading":
            engine.wake()
            await asyncio.sleep(0.02)
        if entry.state == "failed":
            message = entry.error
            store.remove(entry.name)
            raise ApiError(422, message, "lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request, body: UnloadAdapter):
        check_admin(request)
        try:
            entry = store.remove(body.lora_name)
        except UnknownModel as exc:
            raise ApiError(404, str(exc), "lora_name") from None
        engine.call(lambda: engine.unload(entry))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/")
    async def playground():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def chat_ids(tokenizer: Any, body: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(
            400, f"the model {body.model!r} has no chat template; use /v1/completions", "messages"
        )
    turns = tuple({"role": m.role, "content": m.text} for m in body.messages)
    turns += ({"role": "assistant", "content": ""},)
    formatter = Formatter(tokenizer, 10**9)
    try:
        return formatter.generation_prompt(Example("request", turns, kind="messages"))[0]
    except Exception as exc:  # noqa: BLE001 - a template that cannot render these turns
        message = f"the chat template cannot render these messages: {exc}"
        raise ApiError(400, message, "messages") from None


def completion_ids(tokenizer: Any, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=True)["input_ids"]]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompt]
