"""Building a server from its options and running it: the base loaded (quantized if asked), the
adapter store, the engine's thread, and uvicorn on the chosen host and port.

SIGINT and SIGTERM (uvicorn's handlers) stop accepting connections; running requests have
``grace`` seconds to finish, then the engine cancels what is left (a stream ends with an error
event and ``[DONE]``) and the process exits with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from .app import Settings, create_app
from .engine import Engine
from .store import AdapterStore

log = logging.getLogger("lorakit.serve")


@dataclass
class Options:
    """Everything ``lorakit serve`` takes (flags of the same names)."""

    base: str | None = None
    adapters: str | None = None
    adapter: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    quantize: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    served_model_name: str | None = None
    api_key: str | None = None
    admin_key: str | None = None
    max_loras: int = 8
    max_lora_memory: int | None = None  # bytes of adapters in memory; None: no byte limit
    max_seqs: int = 16
    max_waiting: int = 256
    max_prompt_tokens: int = 2048
    max_prefill_tokens: int = 2048
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    allow_bin: bool = False
    grace: float = 10.0
    threads: int | None = None


def device_named(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def base_name(options: Options, model) -> str:
    if options.served_model_name:
        return options.served_model_name
    from ..models import DEFAULT_MODEL_ID

    name = getattr(model.config, "name_or_path", "") or options.base or DEFAULT_MODEL_ID
    return str(name).rstrip("/")


def build(options: Options, model=None, tokenizer=None) -> tuple[Engine, Settings]:
    """The engine (not started) and the app's settings; ``model``/``tokenizer`` given: used as
    the base instead of loading ``options.base``."""
    if options.adapters is not None and not Path(options.adapters).is_dir():
        raise ConfigError(f"--adapters {options.adapters}: not a directory")
    if options.threads:
        torch.set_num_threads(options.threads)
    if model is None:
        from ..models import load_model

        dtype = getattr(torch, options.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"--dtype {options.dtype!r}: expected float32, bfloat16 or float16")
        model, tokenizer = load_model(options.base, dtype=dtype, quantize=options.quantize)
    if tokenizer is None:
        raise ConfigError("the base model has no tokenizer; the server needs one")
    model.to(device_named(options.device))
    name = base_name(options, model)
    store = AdapterStore(
        options.adapters,
        options.adapter,
        max_loras=options.max_loras,
        max_bytes=options.max_lora_memory,
        allow_bin=options.allow_bin,
        reserved=(name,),
    )
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(configured if isinstance(configured, list) else [configured]) - {None}
    engine = Engine(
        model,
        tokenizer,
        store,
        max_seqs=options.max_seqs,
        max_waiting=options.max_waiting,
        prefill_tokens=options.max_prefill_tokens,
        eos=eos,
    )
    settings = Settings(
        base_name=name,
        api_key=options.api_key or os.environ.get("LORAKIT_API_KEY") or None,
        admin_key=options.admin_key or os.environ.get("LORAKIT_ADMIN_KEY") or None,
        max_prompt_tokens=options.max_prompt_tokens,
        max_tokens=options.max_tokens,
        default_max_tokens=min(options.default_max_tokens, options.max_tokens),
        max_body_bytes=options.max_body_bytes,
        context_length=getattr(model.config, "max_position_embeddings", None),
    )
    return engine, settings


def uvicorn_server(engine: Engine, settings: Settings, host: str, port: int, grace: float):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGINT or SIGTERM that stopped it is not raised again once
        it has shut down cleanly: the process exits with status 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            # the engine finishes what runs within the grace period, then ends the rest with an
            # error event, so every stream is closed properly before uvicorn closes connections
            if not self.should_exit:
                threading.Thread(target=engine.shutdown, args=(grace,), daemon=True).start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=grace + 5,
        access_log=False,
    )
    return Server(config)


def run(options: Options) -> int:
    engine, settings = build(options)
    server = uvicorn_server(engine, settings, options.host, options.port, options.grace)
    engine.start()
    names = engine.store.names()
    print(f"serving {settings.base_name} and {len(names)} adapter(s): {', '.join(names) or '-'}")
    print(f"listening on http://{options.host}:{options.port} (Ctrl-C to stop)", flush=True)
    try:
        server.run()
    finally:
        engine.shutdown(grace=0)
    print("stopped", flush=True)
    return 0
