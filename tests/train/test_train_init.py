"""``lorakit train`` with inits that rewrite the base: ``lora.init: pissa`` (and olora) writes the
adapter converted to a plain LoRA of the untouched base; ``method: qlora`` with ``init: loftq``
starts LoftQ from the full-precision weights and quantizes the rest; a resumed PiSSA run writes
the same file as the run it continues."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
import lorakit.models
from conftest import Crash, CrashAt, char_tokenizer, resumed, run, run_config, tiny_llama
from lorakit.cli.main import main
from lorakit.quant import QuantizedWeight

X = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))


def adapter_json(out: Path) -> dict:
    return json.loads((out / "adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_run_writes_the_converted_adapter(tmp_path, init):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    cfg = run_config(tmp_path, lora={"r": 4, "alpha": 8, "init": init})
    result = run(cfg, model=model, tokenizer=tokenizer)
    data = adapter_json(result.out_dir)
    assert data["init_lora_weights"] is True and (data["r"], data["lora_alpha"]) == (8, 16)
    fresh = lorakit.load_adapter(tiny_llama(len(tokenizer)), result.saved)
    torch.testing.assert_close(fresh(X).logits, model(X).logits)


def test_qlora_with_loftq_quantizes_from_full_precision(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    cfg = run_config(
        tmp_path,
        lora={"r": 4, "alpha": 8, "init": "loftq", "target_modules": ["q_proj", "v_proj"]},
        training={"method": "qlora"},
    )
    result = run(cfg, model=model, tokenizer=tokenizer)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.weight, QuantizedWeight)  # LoftQ's Q
    assert isinstance(layer.mlp.up_proj.weight, QuantizedWeight)  # quantized after it
    data = adapter_json(result.out_dir)
    assert data["init_lora_weights"] == "loftq" and data["r"] == 4
    fresh = lorakit.load_adapter(tiny_llama(len(tokenizer)), result.saved)
    fresh = lorakit.quantize(fresh)  # the layers LoftQ left, as method qlora quantizes them
    torch.testing.assert_close(fresh(X).logits, model(X).logits)


def test_qlora_with_pissa_quantizes_the_residual(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    cfg = run_config(tmp_path, lora={"init": "pissa"}, training={"method": "qlora"})
    result = run(cfg, model=model, tokenizer=tokenizer)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.weight, QuantizedWeight) and "default" in q_proj.lora_initial
    assert adapter_json(result.out_dir)["init_lora_weights"] is True


def test_a_resumed_pissa_run_writes_the_same_adapter(tmp_path):
    sections = {
        "lora": {"r": 4, "alpha": 8, "init": "pissa_niter_2"},
        "training": {"steps": 6, "checkpoint_every": 2, "threads": 1},
    }
    whole = run(run_config(tmp_path / "whole", **sections))
    cfg = run_config(tmp_path / "crashed", **sections)
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(5)])
    again = run(resumed(cfg))
    assert again.start_step == 4
    one = load_file(whole.saved / "adapter_model.safetensors")
    two = load_file(again.saved / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], msg=key)


def test_lorakit_train_cli_with_pissa(tmp_path, monkeypatch, capsys):
    from conftest import date_rows, write_jsonl

    tokenizer = char_tokenizer()
    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (tiny_llama(len(tokenizer)), tokenizer)
    )
    write_jsonl(tmp_path / "train.jsonl", date_rows(8))
    (tmp_path / "run.yaml").write_text(
        "data: {train: train.jsonl}\n"
        f"output: {{dir: {tmp_path / 'out'}, plot: false}}\n"
        "training: {steps: 2, batch_size: 4}\nlora: {r: 4, init: pissa}\n"
        "evaluation: {before: false}\n"
    )
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    data = adapter_json(tmp_path / "out")
    assert data["init_lora_weights"] is True and data["r"] == 8
