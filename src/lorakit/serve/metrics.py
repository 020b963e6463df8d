"""``GET /metrics``: the engine's counters in Prometheus' text format (version 0.0.4)."""

from __future__ import annotations

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _line(name: str, value: float, help_: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]


def render_metrics(engine) -> str:
    running, waiting = engine.counts
    store = engine.store
    stats = engine.stats
    lines: list[str] = []
    lines += _line("lorakit_requests_total", stats["requests"], "requests accepted", "counter")
    lines += _line(
        "lorakit_prompt_tokens_total", stats["prompt_tokens"], "prompt tokens prefilled", "counter"
    )
    lines += _line(
        "lorakit_generation_tokens_total", stats["generated_tokens"], "tokens generated", "counter"
    )
    lines += _line("lorakit_num_requests_running", running, "sequences in the batch", "gauge")
    lines += _line("lorakit_num_requests_waiting", waiting, "requests waiting to start", "gauge")
    lines += _line("lorakit_adapters_loaded", len(store.loaded()), "adapters in memory", "gauge")
    lines += _line(
        "lorakit_adapter_memory_bytes",
        store.bytes_loaded(),
        "bytes of the adapters' tensors in memory",
        "gauge",
    )
    lines += _line(
        "lorakit_adapter_stack_bytes",
        engine.stack_bytes,
        "bytes of the stacked adapter copies kept for mixed batches of many adapters",
        "gauge",
    )
    budget = "+Inf" if store.max_bytes is None else store.max_bytes
    lines += _line(
        "lorakit_adapter_memory_budget_bytes", budget, "--max-lora-memory (+Inf: none)", "gauge"
    )
    lines += _line("lorakit_adapter_loads_total", store.loads, "adapters loaded", "counter")
    lines += _line(
        "lorakit_adapter_evictions_total", store.evictions, "adapters evicted", "counter"
    )
    lines += _line(
        "lorakit_adapter_load_failures_total", store.failures, "adapter loads failed", "counter"
    )
    name = "lorakit_batch_size"
    lines += [f"# HELP {name} rows per decoding step", f"# TYPE {name} histogram"]
    sizes = dict(engine.batch_sizes)
    for bound in BUCKETS:
        count = sum(n for size, n in sizes.items() if size <= bound)
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {sum(sizes.values())}')
    lines.append(f"{name}_sum {sum(size * n for size, n in sizes.items())}")
    lines.append(f"{name}_count {sum(sizes.values())}")
    return "\n".join(lines) + "\n"
