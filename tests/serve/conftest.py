"""Fixtures of the serving tests: the saved base and adapters, and a server over them."""

from __future__ import annotations

import pytest

from char_tokenizer import char_tokenizer
from serving import ADAPTERS, Running, base_model, save_adapter_for


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """(base directory, adapters directory)."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = char_tokenizer()
    base_dir = root / "base"
    base_model(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    adapters = root / "adapters"
    for seed, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        target = adapters / name / "adapter" if name == "gamma" else adapters / name
        save_adapter_for(base_dir, target, r, targets, seed)
    return base_dir, adapters


@pytest.fixture(scope="module")
def server(served):
    base_dir, adapters = served
    running = Running(base=str(base_dir), adapters=str(adapters), max_loras=8)
    yield running
    running.stop()
