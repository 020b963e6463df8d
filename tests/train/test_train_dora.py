"""``lorakit train`` with ``lora.use_dora: true``: the magnitudes train, the adapter is PEFT's DoRA
layout, it loads back to the trained model's outputs, and ``method: qlora`` gives QDoRA."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import char_tokenizer, run, run_config, tiny_llama

X = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_dora_run_trains_the_magnitudes_and_writes_peft_dora_files(tmp_path, method):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    fresh = tiny_llama(len(tokenizer))
    start = {n: t.detach().clone() for n, t in fresh.state_dict().items() if "proj.weight" in n}
    cfg = run_config(
        tmp_path, lora={"r": 4, "alpha": 8, "use_dora": True}, training={"method": method}
    )
    result = run(cfg, model=model, tokenizer=tokenizer)
    data = json.loads((result.saved / "adapter_config.json").read_text())
    assert data["use_dora"] is True
    tensors = load_file(result.saved / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    norms = start["model.layers.0.self_attn.q_proj.weight"].norm(dim=1)
    assert tensors[key].shape == norms.shape and not torch.allclose(tensors[key], norms)
    loaded = lorakit.load_adapter(
        fresh if method == "lora" else lorakit.quantize(fresh), result.saved
    )
    torch.testing.assert_close(loaded(X).logits, model(X).logits)
    if method == "lora":  # PEFT reads the same file to the same outputs
        theirs = peft.PeftModel.from_pretrained(tiny_llama(len(tokenizer)), result.saved)
        torch.testing.assert_close(theirs(X).logits, model(X).logits, rtol=1e-4, atol=1e-5)
