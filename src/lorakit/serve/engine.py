"""The continuous-batching engine: one thread owns the model and runs decoding steps.

Each turn of the loop (``Engine.run``):

1. runs the control work handed to it (an admin's unload) and attaches adapters whose files the
   store's worker has read, first evicting least recently used idle ones past the store's
   limits (``max_loras`` adapters, ``max_bytes`` of their tensors);
2. admits waiting requests while there is room (``max_seqs`` rows): the prompts admitted
   together are prefilled in one forward (left-padded, each row with its own adapter, at most
   ``prefill_tokens`` padded tokens per forward), each one's first token chosen, and their
   caches join the batch (:class:`~lorakit.serve.batch.BatchCache`); a request whose adapter is
   still loading waits without holding up those behind it;
3. runs one forward of one new token for every running row, rows on different adapters (and on
   the base) in the same batch through :func:`lorakit.adapter_per_row`, and picks each row's next
   token with its own sampling settings and random stream (:mod:`lorakit.sampling`);
4. sends each request its new text; rows that finished, or whose client went away, leave.

Requests talk to the engine through ``submit`` and the ``emit`` callback they carry (called from
the engine's thread with event dicts: ``delta``, ``done`` per choice, ``error``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..model import adapter_per_row, list_adapters
from ..sampling import Sampling, StopText, choose, generator_for
from .batch import BatchCache, cache_keyword, keeps_last_logits, layers_of, new_cache
from .loading import AdapterLoading
from .store import AdapterStore, Entry

log = logging.getLogger("lorakit.serve")


class Busy(LorakitError, RuntimeError):
    """The waiting queue is full, or the server is shutting down."""


@dataclass(eq=False)
class Request:
    """One API request: its prompts (token ids), each answered ``n`` times."""

    id: str
    model: str  # the name it asked for
    adapter: str | None  # None: the base
    prompts: list[list[int]]
    n: int
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    emit: Callable[[dict], None]
    tokenizer: Any = None  # the adapter's own, or the base's
    cancelled: threading.Event = field(default_factory=threading.Event)
    entry: Entry | None = None
    arrived: float = field(default_factory=time.monotonic)
    next_prompt: int = 0  # prompts admitted so far
    failed: bool = False  # an error was sent: it gets nothing more
    min_tokens: int = 0  # no end-of-text token and no stop string before this many tokens
    ignore_eos: bool = False  # an end-of-text token does not end the answer

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class Job:
    """One choice of a request: a row of the batch while it runs."""

    request: Request
    index: int  # the choice's index in the response
    prompt_len: int
    sampling: Sampling
    generator: torch.Generator
    stop: StopText
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    stops_from: int = 0  # stop strings count from here in the text (see min_tokens)
    last: int = 0
    finish: str | None = None


class Engine(AdapterLoading):
    """See the module docstring. ``eos``: the token ids that end an answer."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        store: AdapterStore,
        *,
        max_seqs: int = 16,
        max_waiting: int = 256,
        prefill_tokens: int = 2048,
        eos: set[int] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.max_seqs = max_seqs
        self.max_waiting = max_waiting
        self.prefill_tokens = prefill_tokens
        self.device = next(model.parameters()).device
        self.eos = set(eos or ())
        self.cache_kw = cache_keyword(model)
        self.keep_last = keeps_last_logits(model)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Job] = []
        self.batch = BatchCache()
        self.cv = threading.Condition()
        self.control: list[Callable[[], None]] = []
        self.unloading: list[Entry] = []
        self.rows_block = None  # the open adapter_per_row block and the rows it was made for
        self.rows_key: tuple | None = None
        self.lora_layers: list = []  # the model's LoRA layers, taken again when adapters change
        self.stopping = False
        self.closed = False
        self.stats = collections.Counter()
        self.batch_sizes = collections.Counter()  # rows per decoding step -> steps
        self.thread = threading.Thread(target=self.run, name="lorakit-engine", daemon=True)

    # -- the interface the HTTP side uses ---------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> None:
        with self.cv:
            if self.stopping:
                raise Busy("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"the waiting queue is full ({self.max_waiting} requests)")
            if request.entry is not None:
                with self.store.lock:
                    request.entry.users += 1
                self.start_load_of(request.entry)
            self.waiting.append(request)
            self.stats["requests"] += 1
            self.cv.notify()

    def call(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the engine's thread between two steps."""
        with self.cv:
            self.control.append(work)
            self.cv.notify()

    def wake(self, *_: object) -> None:
        with self.cv:
            self.cv.notify()

    def shutdown(self, grace: float) -> None:
        """Stop admitting; let running rows finish for ``grace`` seconds, then cancel them."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.running or self.waiting):
            time.sleep(0.02)
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=30)
        self.store.close()

    @property
    def counts(self) -> tuple[int, int]:
        """(running rows, waiting requests)."""
        return len(self.running), len(self.waiting)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self.cv:
                while not (self.closed or self.control or self._has_work()):
                    self.cv.wait(timeout=0.5)
                if self.closed:
                    break
                control, self.control = self.control, []
            try:
                for work in control:
                    work()
                self._attach_ready()
                self._admit()
                self._drop_cancelled()
                if self.running:
                    self._step()
                self._unload_idle()
            except Exception:  # the engine must outlive any one request's failure
                log.exception("engine step failed; failing the running requests")
                self._fail_running("internal error in the decoding step")
        self._close_rows()
        for job in self.running:
            self._error(job.request, 503, "the server shut down before the answer was finished")
        for request in self.waiting:
            self._error(request, 503, "the server shut down before the request was started")

    def _has_work(self) -> bool:
        if self.running or self._read_done():
            return True
        if self.stopping:
            return bool(self.waiting)
        return any(self._admissible(r) != "wait" for r in self.waiting)

    def _admissible(self, request: Request) -> str:
        """'go', 'wait' (its adapter is loading) or 'failed'."""
        entry = request.entry
        if entry is None or entry.state in ("ready", "on disk"):
            return "go"  # ready, or to be read (again, after an eviction)
        if entry.state == "failed" and entry.future is None:
            return "failed"
        if entry.future is not None and entry.future.done():
            return "go"  # read, to be attached
        return "wait"

    # -- admitting and stepping -------------------------------------------------------------
    def _admit(self) -> None:
        """Take waiting prompts in order of arrival while rows are free, and prefill them
        together (``_prefill``), at most ``prefill_tokens`` padded tokens per forward."""
        chosen: list[tuple[Request, int]] = []
        rows, width = len(self.running), 0
        for request in list(self.waiting):
            if request.cancelled.is_set():  # its client left before it had a row
                self.waiting.remove(request)
                self._release(request)
                self.stats["cancelled"] += 1
                continue
            state = self._admissible(request)
            if state == "failed":
                self.waiting.remove(request)
                self._error(request, 422, request.entry.error)
                continue
            if state == "wait" or (request.entry and request.entry.state != "ready"):
                continue
            full = False
            while request.next_prompt < len(request.prompts):
                if rows + request.n > self.max_seqs and (self.running or chosen):
                    full = True  # no room now; keep the order of arrival
                    break
                wide = max(width, len(request.prompts[request.next_prompt]))
                if chosen and wide * (len(chosen) + 1) > self.prefill_tokens:
                    self._prefill(chosen)  # this forward is full: run it, go on with a new one
                    chosen, rows, width = [], len(self.running), 0
                    if request.failed:
                        break
                    continue
                chosen.append((request, request.next_prompt))
                request.next_prompt += 1
                rows, width = rows + request.n, wide
            if full:
                break
            if request in self.waiting:
                self.waiting.remove(request)
        if chosen:
            self._prefill(chosen)

    def _rows(self, names: list[str | None]) -> None:
        """Put the rows' adapters in force. The block of ``adapter_per_row`` stays open across
        decoding steps while the rows stay the same, so each layer gathers its rows' A and B
        once for the stretch instead of once per step; it closes when the rows change and
        before any adapter is attached or evicted."""
        key = tuple(names)
        if key == self.rows_key:
            return
        self._close_rows()
        if list_adapters(self.model):
            block = adapter_per_row(self.model, key)
            block.__enter__()
            self.rows_block = block
        self.rows_key = key

    def _close_rows(self) -> None:
        block, self.rows_block, self.rows_key = self.rows_block, None, None
        if block is not None:
            block.__exit__(None, None, None)

    def _forward(self, names, **inputs):
        try:
            self._rows(names)
            with torch.no_grad():
                return self.model(**inputs, use_cache=True)
        except BaseException:
            self._close_rows()
            raise

    def _prefill(self, chosen: list[tuple[Request, int]]) -> None:
        """Prefill the prompts ``chosen`` ((request, prompt index) each) in one forward and join
        their rows to the batch. If the forward fails, each prompt is tried alone, so a bad
        request fails by itself."""
        try:
            out, cache = self._prefill_forward(chosen)
        except Exception as exc:  # noqa: BLE001 - said to the requests, the batch goes on
            if len(chosen) == 1:
                self._prefill_failed(chosen[0][0], exc)
                return
            for one in chosen:
                if not one[0].failed:
                    self._prefill([one])
            return
        try:
            self._join(chosen, out.logits[:, -1], cache)
        except Exception as exc:  # noqa: BLE001
            for request in {id(r): r for r, _ in chosen}.values():
                self._prefill_failed(request, exc)

    def _prefill_failed(self, request: Request, exc: BaseException) -> None:
        self._drop(request)
        if isinstance(exc, LorakitError):  # a model the engine cannot batch: said as it is
            self._error(request, 500, str(exc))
            return
        log.error("prefill failed for a request on %s", request.model, exc_info=exc)
        self._error(request, 500, "internal error while reading the prompt")

    def _prefill_forward(self, chosen: list[tuple[Request, int]]):
        """One forward of the prompts, left-padded to the longest: (output, its cache)."""
        prompts = [request.prompts[p] for request, p in chosen]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(x)) + x for x in prompts], device=self.device)
        cache = new_cache()
        inputs: dict[str, Any] = {"input_ids": ids, self.cache_kw: cache}
        if len(prompts) > 1:  # padding masked out, each prompt at its own positions
            lengths = torch.tensor([len(x) for x in prompts], device=self.device)
            mask = torch.arange(width, device=self.device)[None, :] >= (width - lengths)[:, None]
            inputs["attention_mask"] = mask.long()
            inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp(min=0)
        if self.keep_last:  # only the last position's logits are used
            inputs["logits_to_keep"] = 1
        now = time.monotonic()
        for request, _ in chosen:
            if request.entry is not None:
                request.entry.last_used = now
        out = self._forward([request.adapter for request, _ in chosen], **inputs)
        self.stats["prompt_tokens"] += sum(map(len, prompts))
        self.stats["prefills"] += 1
        return out, cache

    def _join(self, chosen: list[tuple[Request, int]], logits: torch.Tensor, cache) -> None:
        """The prefilled prompts' rows join the batch, ``n`` per prompt, each with its first
        token chosen from its prompt's ``logits``."""
        lengths = [len(request.prompts[p]) for request, p in chosen]
        jobs = []
        for row, (request, p) in enumerate(chosen):
            for k in range(request.n):
                index = p * request.n + k
                sampling = request.sampling
                if sampling.seed is not None and index:
                    sampling = Sampling(**{**sampling.__dict__, "seed": sampling.seed + index})
                generator, stop = generator_for(sampling), StopText(request.stops)
                jobs.append((Job(request, index, lengths[row], sampling, generator, stop), row))
        self.batch.join(layers_of(cache), lengths, [request.n for request, _ in chosen])
        self.running += [job for job, _ in jobs]
        for job, row in jobs:
            self._advance(job, logits[row])
        self._leave()

    def _step(self) -> None:
        jobs = self.running
        self.batch_sizes[len(jobs)] += 1
        self.stats["steps"] += 1
        cache, mask, positions = self.batch.step_inputs()
        ids = torch.tensor([[j.last] for j in jobs], device=self.device)
        out = self._forward(
            [j.request.adapter for j in jobs],
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self.cache_kw: cache},
        )
        self.batch.after_step(cache)
        logits = out.logits[:, -1]
        for i, job in enumerate(jobs):
            self._advance(job, logits[i])
        self._leave()

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Take one token for ``job`` and tell its request what is new."""
        request = job.request
        early = len(job.tokens) < request.min_tokens  # this token may not end the answer
        banned = tuple(self.eos) if early else ()
        choice = choose(logits, job.sampling, job.generator, banned)
        job.tokens.append(choice.token)
        job.last = choice.token
        self.stats["generated_tokens"] += 1
        tokenizer = request.tokenizer
        ended = choice.token in self.eos and not request.ignore_eos
        text_ids = job.tokens[:-1] if ended else job.tokens
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        if early:  # stop strings are looked for in what comes after min_tokens
            job.stops_from = len(text)
        safe, stopped = job.stop.scan(text, job.stops_from)
        if stopped or ended:
            job.finish = "stop"
        elif len(job.tokens) >= request.max_tokens:
            job.finish = "length"
        if job.finish and not stopped:
            safe = text
        event: dict[str, Any] = {"kind": "delta", "index": job.index, "text": safe[len(job.sent) :]}
        job.sent = safe
        if job.sampling.top_logprobs is not None:
            event["logprob"] = self._logprob(tokenizer, choice)
        if event["text"] or "logprob" in event:
            request.emit(event)
        if job.finish:
            request.emit(
                {
                    "kind": "done",
                    "index": job.index,
                    "finish_reason": job.finish,
                    "prompt_tokens": job.prompt_len,
                    "completion_tokens": len(job.tokens),
                }
            )

    @staticmethod
    def _logprob(tokenizer, choice) -> dict:
        def text(t: int) -> str:
            return tokenizer.decode([t])

        return {
            "token": text(choice.token),
            "logprob": choice.logprob,
            "top": [(text(t), lp) for t, lp in choice.top],
        }

    def _drop_cancelled(self) -> None:
        for job in self.running:
            if job.request.cancelled.is_set() and job.finish is None:
                job.finish = "cancelled"
                self.stats["cancelled"] += 1
        self._leave()

    def _leave(self) -> None:
        keep = [i for i, j in enumerate(self.running) if j.finish is None]
        if len(keep) == len(self.running):
            return
        gone = {id(j.request): j.request for j in self.running if j.finish is not None}
        self.running = [self.running[i] for i in keep]
        self.batch.keep(keep)
        still = {id(j.request) for j in self.running}
        for key, request in gone.items():
            if key not in still and request not in self.waiting:
                self._release(request)

    def _drop(self, request: Request) -> None:
        """Take every row and the queue entry of ``request`` out (it failed)."""
        keep = [i for i, j in enumerate(self.running) if j.request is not request]
        if len(keep) != len(self.running):
            self.running = [self.running[i] for i in keep]
            self.batch.keep(keep)
        if request in self.waiting:
            self.waiting.remove(request)

    def _release(self, request: Request) -> None:
        if request.entry is not None:
            with self.store.lock:
                request.entry.users -= 1
                request.entry.last_used = time.monotonic()

    def _error(self, request: Request, status: int, message: str) -> None:
        request.failed = True
        self._release(request)
        request.emit({"kind": "error", "status": status, "message": message})

    def _fail_running(self, message: str) -> None:
        failed = {id(j.request): j.request for j in self.running}
        self.running = []
        self.batch = BatchCache()
        for request in failed.values():
            if request in self.waiting:
                self.waiting.remove(request)
            self._error(request, 500, message)
