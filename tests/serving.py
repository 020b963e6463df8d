"""What the serving tests share: a tiny Llama with a character tokenizer, adapters of different
ranks and targets, and ``Running``, uvicorn on a free loopback port in a thread of the test
process, talked to over real HTTP. A plain module on pytest's path (tests/serve/conftest.py makes
the fixtures)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import torch

import lorakit
from tiny_models import tiny_llama

#: adapter name -> (rank, targets); saved as DIR/NAME, except "gamma", saved as a run's adapter
ADAPTERS = {
    "alpha": (4, ["q_proj", "v_proj"]),
    "beta": (8, "all-linear"),
    "gamma": (2, ["o_proj", "down_proj"]),
}


def base_model(tokenizer):
    model = tiny_llama(
        0,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=4,
    )
    return model


def save_adapter_for(base_dir: Path, target: Path, r: int, targets, seed: int) -> Path:
    from lorakit.models import load_model

    model, _ = load_model(base_dir)
    config = lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets)
    lorakit.apply_lora(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.normal_(0, 0.5)
    return lorakit.save_adapter(model, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server started from ``lorakit.serve.server.Options`` in this process, on loopback."""

    def __init__(self, **options) -> None:
        from lorakit.serve.server import Options, build, uvicorn_server

        self.port = free_port()
        self.options = Options(port=self.port, **options)
        self.engine, self.settings = build(self.options)
        self.server = uvicorn_server(self.engine, self.settings, "127.0.0.1", self.port, 1.0)
        self.server.config.log_level = "warning"
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine.start()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    @property
    def base(self) -> str:
        return self.settings.base_name

    def client(self, key: str | None = "none", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.shutdown(grace=0)
