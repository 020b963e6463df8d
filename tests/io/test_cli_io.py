"""``lorakit merge`` and ``lorakit inspect``, run in-process through ``lorakit.cli.main.main``
(plus one smoke test of the installed command in a subprocess)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from io_models import llama_files

import lorakit
from lorakit import LoraConfig
from lorakit.cli.main import main
from tiny_models import logits, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


@pytest.fixture
def files(tmp_path):
    """(base directory, adapter directory, adapted model)."""
    return llama_files(tmp_path, CONFIG)


def test_merge(files, tmp_path, capsys):
    base, adapter, adapted = files
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 0
    assert "merged" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, tokens(128)), logits(adapted, tokens(128)))
    # a second run refuses, then replaces when asked
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out")]) == 2
    assert "overwrite" in capsys.readouterr().err
    argv = ["merge", str(base), str(adapter), str(tmp_path / "out"), "--overwrite"]
    assert main([*argv, "--dtype", "float16"]) == 0


def test_merge_errors(files, tmp_path, capsys):
    base, adapter, _ = files
    assert main(["merge", str(tmp_path / "out")]) == 2
    assert "expected [BASE] ADAPTER OUT" in capsys.readouterr().err
    assert main(["merge", str(base), str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "lorakit merge: error:" in err and "does not exist" in err
    assert main(["merge", str(tmp_path / "nobase"), str(adapter), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", str(base), str(adapter), str(tmp_path / "o"), "--dtype", "int8"]) == 2
    assert "floating dtype" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_inspect_adapter_text(files, capsys):
    _, adapter, _ = files
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "r=4 alpha=8" in out
    assert "task_type=CAUSAL_LM" in out
    rows = [line.split() for line in out.splitlines()]
    assert "model.layers.0.self_attn.q_proj linear 4 (4, 64) (64, 4) 512".split() in rows
    assert "lm_head.weight" in out and "saved" in out
    assert "LlamaForCausalLM (llama, float32), 4 modules, weights" in out
    assert "4 adapted modules, 9,984 trainable parameters" in out  # 2·(512 + 384) + 128·64
    assert "lorakit " in out and "KiB" in out


def test_inspect_adapter_json(files):
    _, adapter, _ = files
    info = lorakit.inspect_adapter(adapter)
    assert main(["inspect", str(adapter), "--json"]) == 0  # same content, printed
    assert [m["path"] for m in info["modules"]] == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    q = info["modules"][0]
    assert (q["kind"], q["r"], q["A"], q["B"], q["params"]) == ("linear", 4, [4, 64], [64, 4], 512)
    assert info["params"] == 4 * 512 - 2 * 4 * 32 + 128 * 64  # v_proj outputs 32 (2 kv heads)
    assert info["trainable_params"] == info["params"]
    assert info["config"]["modules_to_save"] == ["lm_head"]
    assert info["fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert info["file_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size


def test_inspect_json_is_machine_readable(files, capsys):
    _, adapter, _ = files
    main(["inspect", str(adapter), "--json"])
    assert json.loads(capsys.readouterr().out)["peft_config"]["peft_type"] == "LORA"


def test_inspect_base_plan(files, capsys):
    base, _, _ = files
    argv = ["inspect", str(base), "--r", "4", "--alpha", "8", "--target", "q_proj", "v_proj"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "model.layers.1.self_attn.v_proj" in out
    assert "4 modules, 1,792 adapter parameters" in out
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = lorakit.plan(
        tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    assert data["adapter_params"] == expected.adapter_params
    assert data["total"] == expected.total
    assert main(["inspect", str(base)]) == 0  # defaults: r=8, all-linear
    assert "14 modules" in capsys.readouterr().out


def test_inspect_errors(files, tmp_path, capsys):
    base, adapter, _ = files
    assert main(["inspect", str(adapter), "--r", "4"]) == 2
    assert "plan options apply to a base model" in capsys.readouterr().err
    assert main(["inspect", str(base), "--target", "nothing_here"]) == 2
    assert "matches no module" in capsys.readouterr().err
    assert main(["inspect", str(base), "--r", "0"]) == 2
    assert "--r 0: expected a positive integer" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(adapter)]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "merge" in out and "inspect" in out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2


def test_console_command_in_a_subprocess(files):
    _, adapter, _ = files
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "inspect", str(adapter), "--json"],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert json.loads(run.stdout)["config"]["r"] == 4


@pytest.mark.slow
def test_inspect_the_embedded_model(capsys):
    assert main(["inspect", "default", "--r", "16", "--alpha", "32"]) == 0
    assert "210 modules, 4,884,480 adapter parameters" in capsys.readouterr().out
