"""The serving benchmark's load: the clients' chat prompts (about 32 tokens each once rendered)
and the HTTP clients that send them, each on its own thread and connection, with what each
request got back (bench_serve.py)."""

from __future__ import annotations

import collections
import json
import math
import threading
import time
from dataclasses import dataclass, field

NEW = 64  # new tokens a request asks for
REQUEST_TIMEOUT = 300.0  # seconds, one request
SYSTEM = "You are a helpful assistant."
TOPICS = [
    "the sea",
    "the moon",
    "volcanoes",
    "honey bees",
    "glaciers",
    "the desert",
    "owls",
    "rainbows",
    "coral reefs",
    "thunderstorms",
    "bamboo",
    "comets",
    "penguins",
    "rivers",
    "mushrooms",
    "the wind",
]


def messages(i: int) -> list[dict]:
    """Client ``i``'s chat: about 32 tokens once the chat template has rendered it."""
    topic = TOPICS[i % len(TOPICS)]
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": f"Write three short sentences about {topic} for a curious child.",
        },
    ]


@dataclass
class Result:
    ok: bool = False
    latency: float = math.nan  # seconds, sending the request to its last byte
    ttft: float = math.nan  # seconds, to the first chunk with text (streams only)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    error: str = ""


@dataclass
class Round:
    wall: float
    results: list[Result] = field(default_factory=list)
    steps: collections.Counter = field(default_factory=collections.Counter)  # rows -> steps

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results if r.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)


def one_request(
    client, url: str, model: str, i: int, stream: bool, max_tokens: int, extra: dict
) -> Result:
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0}
    body.update(extra)
    out = Result()
    start = time.perf_counter()
    try:
        if not stream:
            r = client.post(url, json=body)
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return out
            data = r.json()
            out.text = data["choices"][0]["message"]["content"] or ""
            out.prompt_tokens = data["usage"]["prompt_tokens"]
            out.completion_tokens = data["usage"]["completion_tokens"]
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    out.error = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                    return out
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if "error" in chunk:
                        out.error = f"stream error: {chunk['error'].get('message')}"
                        return out
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text and math.isnan(out.ttft):
                            out.ttft = time.perf_counter() - start
                        out.text += text
                    if chunk.get("usage"):
                        out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        out.completion_tokens = chunk["usage"]["completion_tokens"]
            if not out.completion_tokens:
                out.error = "the stream ended without a usage chunk"
                return out
    except Exception as exc:  # noqa: BLE001 - every failure of a request is counted as an error
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.latency = time.perf_counter() - start
    out.ok = True
    return out


def clients(
    base_url: str,
    models: list[str],
    stream: bool = False,
    max_tokens: int = NEW,
    timeout: float = REQUEST_TIMEOUT,
    per_client: int = 1,
    extra: dict | None = None,
) -> Round:
    """Client i asks for models[i] with prompt i, ``per_client`` times one after another (the
    next as soon as the last has been answered: a closed loop, so the server sees
    ``len(models)`` requests at once until the last ones end); all clients start at the same
    moment from their own threads and connections; ``extra`` goes into every request's body
    (default: ``min_tokens`` = ``max_tokens``). The round's wall time and every result."""
    import httpx

    url = base_url + "/v1/chat/completions"
    extra = {"min_tokens": max_tokens} if extra is None else extra
    n = len(models)
    results: list[list[Result]] = [[] for _ in range(n)]
    ready = threading.Barrier(n + 1)

    def client(i: int) -> None:
        with httpx.Client(timeout=timeout) as http:
            ready.wait()
            for _ in range(per_client):
                results[i].append(one_request(http, url, models[i], i, stream, max_tokens, extra))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(per_client * timeout + 30)
    wall = time.perf_counter() - start
    flat = [r for i in range(n) for r in results[i]]
    missing = n * per_client - len(flat)
    return Round(wall, flat + [Result(error="no answer")] * missing)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of the finite values."""
    data = sorted(v for v in values if math.isfinite(v))
    if not data:
        return math.nan
    return data[max(0, math.ceil(q / 100 * len(data)) - 1)]
