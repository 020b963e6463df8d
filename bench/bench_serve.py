"""The OpenAI-compatible server under load: 16 adapters served at once, against the base and PEFT.

The embedded SmolLM2-135M-Instruct (float32) serves 16 adapters (r=16 on q/k/v/o, random nonzero
B, seeded) from a directory, started in this process on a free loopback port (max_loras=16,
max_seqs=64). Clients are threads, each with its own httpx connection, that start at the same
moment and send chat requests: a ~32-token prompt, ``max_tokens=64``, temperature 0. In a
throughput round each client sends ``PER_CLIENT`` requests back to back (a closed loop, as
vLLM's ``benchmark_serving --max-concurrency``: 16 requests in flight until the last ones end).
Every request asks for exactly 64 new tokens (``min_tokens`` = ``max_tokens``, vLLM's parameter:
no end-of-text token before then; PEFT's ``min_new_tokens``, and a ``generation_config`` with
the end-of-text id off for ``transformers serve``), so that the sides do the same work whatever the
adapters do to the answers' lengths; every throughput counts the tokens the server says it
generated (``usage.completion_tokens``).

Figures: generated tokens/s with 16 clients each on its own adapter against the same server with
all 16 on the base (rounds interleaved); the 16 clients' first requests answered one at a time by
PEFT (``set_adapter`` + ``generate``); streamed request latency and time to first token at 16
clients and at 64 (4 per adapter); and ``transformers serve`` on the base, run as a subprocess on
the converted model's directory, with the same clients, as an outside anchor.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import _common as C
from _serve_clients import NEW, Round, clients, messages, percentile

NAME = "serve"
TITLE = "Serving 16 adapters over HTTP (lorakit serve, SmolLM2-135M-Instruct, q/k/v/o r=16)"
ANCHOR_PACKAGES = ["peft", "transformers", "openai", "httpx", "uvicorn"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = 16
ROUNDS = 3  # throughput rounds per side (base / adapters), interleaved
PER_CLIENT = 3  # requests each client sends back to back in a throughput round
STREAM_ROUNDS = {16: 2, 64: 1}  # streamed rounds for latency and time to first token
ANCHOR_TIMEOUT = 240.0  # seconds, the whole transformers serve round


# -- set-up ------------------------------------------------------------------------------------
def make_adapters(root: Path) -> list[str]:
    """16 seeded adapters with random nonzero B saved under ``root`` (served as a0..a15)."""
    import lorakit
    from lorakit.models import load_model

    model, _ = load_model()
    config = lorakit.LoraConfig(r=C.RANK, alpha=C.ALPHA, target_modules=TARGETS)
    names = [f"a{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)  # A's initialisation
        model = lorakit.apply_lora(model, config, name)
        C.nonzero_b([layer.lora_B[name] for _, layer in lorakit.lora_layers(model)], seed=200 + i)
        lorakit.save_adapter(model, root / name, name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """lorakit's server in this process, on loopback (as tests/serve/conftest.py's ``Running``)."""

    def __init__(self, adapters: Path, threads: int) -> None:
        import logging

        from lorakit.serve.server import Options, build, uvicorn_server

        self.port = free_port()
        options = Options(
            adapters=str(adapters), max_loras=16, max_seqs=64, threads=threads, port=self.port
        )
        self.engine, self.settings = build(options)
        self.server = uvicorn_server(self.engine, self.settings, "127.0.0.1", self.port, 1.0)
        self.server.config.log_level = "warning"
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the lorakit server did not start")
            time.sleep(0.01)

    @property
    def base(self) -> str:
        return self.settings.base_name

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown(grace=0)


# -- the lorakit server ------------------------------------------------------------------------
def lorakit_server(adapters: Path, names: list[str], threads: int) -> dict:
    server = Server(adapters, threads)
    try:
        base = server.base
        warm = clients(server.url, names + [base])  # reads and attaches every adapter
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {[r.error for r in warm.results if not r.ok]}")
        sides = {"base": [base] * ADAPTERS, "adapters": names}
        rounds: dict[str, list[Round]] = {"base": [], "adapters": []}
        for i in range(ROUNDS):
            order = ["base", "adapters"] if i % 2 == 0 else ["adapters", "base"]
            for side in order:
                before = collections.Counter(server.engine.batch_sizes)
                rd = clients(server.url, sides[side], per_client=PER_CLIENT)
                rd.steps = collections.Counter(server.engine.batch_sizes) - before
                rounds[side].append(rd)
        streamed = {}
        for n, count in STREAM_ROUNDS.items():
            models = [names[i % ADAPTERS] for i in range(n)]
            streamed[n] = [clients(server.url, models, stream=True) for _ in range(count)]
    finally:
        server.stop()
    return {"rounds": rounds, "streamed": streamed}


# -- PEFT, one request at a time ---------------------------------------------------------------
def prompt_ids(tokenizer, i: int) -> list[int]:
    """The token ids the server answers client ``i`` from (its chat formatting)."""
    from lorakit.generate import Example, Formatter

    turns = (*messages(i), {"role": "assistant", "content": ""})
    return Formatter(tokenizer, 10**9).generation_prompt(Example("bench", turns, kind="messages"))[
        0
    ]


def peft_sequential(adapters: Path, names: list[str]) -> tuple[float, list[str], list[int]]:
    """PEFT with the same 16 adapters, answering the 16 requests one after another:
    (generated tokens/s, the answers, tokens generated per request)."""
    from peft import PeftModel

    from lorakit.models import load_model

    base, tokenizer = load_model()
    model = PeftModel.from_pretrained(base, str(adapters / names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters / name), adapter_name=name)
    model.eval()
    eos = tokenizer.eos_token_id
    prompts = [torch.tensor([prompt_ids(tokenizer, i)]) for i in range(ADAPTERS)]

    def answer(i: int, new: int) -> torch.Tensor:
        model.set_adapter(names[i])
        ids = prompts[i]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=eos,
        )
        return out[0, ids.shape[1] :]

    with torch.inference_mode():
        answer(0, 4)  # warm-up
        start = time.perf_counter()
        outs = [answer(i, NEW) for i in range(ADAPTERS)]
        elapsed = time.perf_counter() - start
    counts = [len(o) for o in outs]
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return sum(counts) / elapsed, texts, counts


# -- transformers serve ------------------------------------------------------------------------
def transformers_serve(threads: int, work: Path) -> tuple[float | None, str]:
    """(generated tokens/s of 16 clients on the base, a note); None and the reason when it cannot
    run here."""
    import importlib.util

    import httpx

    from lorakit.models import _gguf_cache_path, embedded_model_path

    exe = Path(sys.executable).with_name("transformers")
    if importlib.util.find_spec("transformers.cli.serve") is None or not exe.is_file():
        return None, "transformers serve: this transformers has no `serve` command"
    cached = _gguf_cache_path(embedded_model_path())
    if not (cached / "config.json").is_file():
        return None, f"transformers serve: no converted model at {cached}"
    # lorakit's cached config has "architectures": null (it comes from the GGUF file), and
    # transformers serve 5.24 indexes config.architectures[0]: a copy with it filled in
    model_dir = work / "tserve-model"
    model_dir.mkdir()
    for f in cached.iterdir():
        if f.name != "config.json":
            (model_dir / f.name).symlink_to(f)
    config = json.loads((cached / "config.json").read_text())
    config["architectures"] = config.get("architectures") or ["LlamaForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))

    port = free_port()
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    command = [str(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--device", "cpu", "--dtype", "float32", "--continuous-batching"]
    log_path = work / "tserve.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                    return None, f"transformers serve exited ({proc.returncode}): {tail}"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    return None, "transformers serve did not answer /health within 180 s"
                time.sleep(1)
            model = str(model_dir)
            # its continuous batching takes only max_new_tokens and eos_token_id per request
            # (no min_new_tokens): NEW tokens each with the end-of-text id off (-1, its "none")
            fixed = {"max_new_tokens": NEW, "eos_token_id": -1, "do_sample": False}
            extra = {"generation_config": json.dumps(fixed)}
            warm = clients(url, [model], max_tokens=8, timeout=ANCHOR_TIMEOUT, extra={})
            if warm.errors:
                return None, f"transformers serve: warm-up failed: {warm.results[0].error}"
            measured = clients(
                url, [model] * ADAPTERS, timeout=ANCHOR_TIMEOUT, per_client=PER_CLIENT, extra=extra
            )
            if measured.errors:
                first = next(r.error for r in measured.results if not r.ok)
                total = len(measured.results)
                return (
                    None,
                    f"transformers serve: {measured.errors}/{total} requests failed: {first}",
                )
            ok = [r for r in measured.results if r.ok]
            shape = (
                f"{statistics.mean(r.prompt_tokens for r in ok):.1f} prompt / "
                f"{statistics.mean(r.completion_tokens for r in ok):.1f} generated tokens each"
            )
            return measured.tokens_per_s, f"transformers serve --continuous-batching ({shape})"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the bench ---------------------------------------------------------------------------------
def cpu_clock() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system


def others_share(start: tuple[float, float, float]) -> float | None:
    """The share of all cores that other processes used since ``start`` (a noisy machine's
    figures are not this bench's)."""
    try:
        end = cpu_clock()
    except (OSError, ValueError, IndexError):
        return None
    wall = end[0] - start[0]
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, others) / (wall * (os.cpu_count() or 1))


def run(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-serve-"))
    try:
        start = cpu_clock()
    except (OSError, ValueError, IndexError):
        start = None
    try:
        adapters = work / "adapters"
        names = make_adapters(adapters)
        served = lorakit_server(adapters, names, threads)
        peft_tps, peft_texts, peft_counts = peft_sequential(adapters, names)
        tserve_tps, tserve_note = transformers_serve(threads, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    others = others_share(start) if start is not None else None
    return rows(served, peft_tps, peft_texts, peft_counts, tserve_tps, tserve_note, others)


def rows(served, peft_tps, peft_texts, peft_counts, tserve_tps, tserve_note, others) -> list[dict]:
    rounds, streamed = served["rounds"], served["streamed"]
    base_tps = statistics.median(r.tokens_per_s for r in rounds["base"])
    lora_tps = statistics.median(r.tokens_per_s for r in rounds["adapters"])
    vs_base = statistics.median(
        a.tokens_per_s / b.tokens_per_s for a, b in zip(rounds["adapters"], rounds["base"])
    )
    first = rounds["adapters"][0].results[::PER_CLIENT]  # each client's first answer
    same = sum(r.ok and r.text.strip() == t.strip() for r, t in zip(first, peft_texts))
    all_results = [r for side in rounds.values() for rd in side for r in rd.results]
    prompt_tokens = statistics.mean(r.prompt_tokens for r in all_results if r.ok)

    def generated(side: str) -> float:
        return statistics.mean(r.completion_tokens for rd in rounds[side] for r in rd.results)

    def mean_rows(side: str) -> float:
        steps = sum((rd.steps for rd in rounds[side]), collections.Counter())
        return sum(k * v for k, v in steps.items()) / max(1, sum(steps.values()))

    def step_ms(rd: Round) -> float:  # a round's wall time per decoding step, prefills included
        return 1e3 * rd.wall / max(1, sum(rd.steps.values()))

    def listed(side: str) -> str:
        return ", ".join(f"{rd.tokens_per_s:.0f}" for rd in rounds[side])

    label = f"16 clients, {NEW} new tokens"
    out = [
        C.row(
            f"{label}: generated tokens/s, each client on its own adapter (lorakit serve) / all "
            f"16 on the base (same server), {ROUNDS} interleaved rounds of {PER_CLIENT} requests "
            "per client back to back",
            lora_tps,
            base_tps,
            "base on the same server",
            vs_base,
            ">= 0.8x",
            "tok/s",
        ),
        C.row(
            f"{label}: 16 adapters, lorakit serve (16 concurrent clients) / PEFT one request at "
            "a time (set_adapter + generate), generated tokens/s",
            lora_tps,
            peft_tps,
            "peft",
            lora_tps / peft_tps,
            ">= 4x",
            "tok/s",
        ),
    ]
    if tserve_tps is not None:
        out.append(
            C.row(
                f"{label}: all on the base, lorakit serve / {tserve_note} (subprocess, the "
                "converted model's directory with config.architectures filled in), tokens/s",
                base_tps,
                tserve_tps,
                "transformers serve",
                base_tps / tserve_tps,
                "",
                "tok/s",
            )
        )
        out.append(
            C.row(
                f"{label}: 16 clients on 16 adapters (lorakit serve) / all 16 on the base with "
                "transformers serve, tokens/s",
                lora_tps,
                tserve_tps,
                "transformers serve, base",
                lora_tps / tserve_tps,
                ">= 1.0x",
                "tok/s",
            )
        )
    else:
        out.append(C.row(f"{label}: anchor not run: {tserve_note}", base_tps, unit="tok/s"))
    for n, rds in streamed.items():
        results = [r for rd in rds for r in rd.results]
        how = f"{n} clients streaming ({n // ADAPTERS} per adapter, {len(results)} requests)"
        for what, key in (("request latency", "latency"), ("time to first token", "ttft")):
            for q in (50, 99):
                value = percentile([getattr(r, key) for r in results], q)
                out.append(C.row(f"{how}: {what} p{q}", value, unit="s"))
        stream_tps = statistics.median(rd.tokens_per_s for rd in rds)
        out.append(C.row(f"{how}: generated tokens/s", stream_tps, unit="tok/s"))
    for n, rds in [(16, rounds["base"] + rounds["adapters"] + streamed[16]), (64, streamed[64])]:
        errors = sum(rd.errors for rd in rds)
        total = sum(len(rd.results) for rd in rds)
        messages_ = sorted({r.error for rd in rds for r in rd.results if not r.ok})
        detail = f" ({'; '.join(messages_)[:150]})" if messages_ else ""
        out.append(C.row(f"errors at {n} clients ({total} requests){detail}", errors, goal="== 0"))
    out += [
        C.row(
            "diagnostic: answers equal to PEFT's, 16 adapters, greedy (text of round 1)",
            f"{same}/16",
        ),
        C.row(
            f"diagnostic: mean prompt tokens per request {prompt_tokens:.1f}; generated tokens "
            f"per request, adapters / base (PEFT: {statistics.mean(peft_counts):.1f})",
            f"{generated('adapters'):.1f} / {generated('base'):.1f}",
        ),
        C.row(
            "diagnostic: 16-client throughput rounds, mean rows per decoding step, adapters / base",
            f"{mean_rows('adapters'):.2f} / {mean_rows('base'):.2f}",
        ),
        C.row(
            "diagnostic: 16-client throughput rounds, round wall time per decoding step "
            "(prefills included), adapters / base",
            statistics.median(step_ms(rd) for rd in rounds["adapters"]),
            statistics.median(step_ms(rd) for rd in rounds["base"]),
            "base",
            statistics.median(
                step_ms(a) / step_ms(b) for a, b in zip(rounds["adapters"], rounds["base"])
            ),
            "",
            "ms",
        ),
        C.row(
            f"diagnostic: tokens/s of each throughput round, adapters: {listed('adapters')}; "
            f"base: {listed('base')}",
            None,
        ),
        C.row(
            f"diagnostic: CPU used by other processes during the bench, share of all "
            f"{os.cpu_count()} cores (subprocess included in this bench's own)",
            None if others is None else f"{others:.0%}",
        ),
    ]
    return out
