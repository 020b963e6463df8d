"""lorakit on real transformers architectures (tiny configs built in code, nothing downloaded).

For Llama, GPT-2, BERT and RoBERTa: the adapted model equals the base at init, generation works
with an adapter and equals the merged model's, half-precision bases stay within their dtype's
rounding, ``merge_and_unload`` gives back the base's exact state-dict keys, and a training step
moves only the adapters.
"""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import lorakit
from lorakit import LoraConfig

VOCAB = 128
BATCH, SEQ = 2, 10
NEW_TOKENS = 6
ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


def llama():
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
    )


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
        )
    )


def bert():
    return BertForMaskedLM(BertConfig(**ENCODER))


def roberta():
    # RoBERTa's positions start after padding_idx (1), so max_position_embeddings needs room
    return RobertaForSequenceClassification(RobertaConfig(**ENCODER, pad_token_id=1, num_labels=3))


# name: (base factory, lorakit config); every config also adapts something non-trivial
MODELS = {
    "llama": (llama, LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "gpt2": (gpt2, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "bert": (bert, LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    "roberta": (
        roberta,
        LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
}
CAUSAL = ["llama", "gpt2"]
HALF = [torch.bfloat16, torch.float16]
# Half-precision tolerance on logits of order one. Every op of a block (norm, projections,
# attention, MLP, residual adds) rounds its output to the dtype, a relative error of up to eps/2
# each; through two blocks and the head that is some tens of roundings that mostly cancel. Observed
# errors against a float32 copy are 1-3 eps; 8 eps times the logit scale leaves room for other seeds
# while still failing on a real bug (a dropped or doubled update moves logits by ~0.1).
HALF_EPS_FACTOR = 8


def ids_batch() -> torch.Tensor:
    return torch.randint(2, VOCAB, (BATCH, SEQ))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomise_b(model, std=0.2):
    """B starts at zero; a random B makes the adapter change the output, as after training."""
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for b in layer.lora_B.values():
                b.normal_(0.0, std)
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * std)


def adapted(name, dtype=torch.float32):
    make, config = MODELS[name]
    base = make().to(dtype).eval()
    model = lorakit.apply_lora(copy.deepcopy(base), config).eval()
    return base, model


@pytest.mark.parametrize("name", list(MODELS))
def test_adapted_model_equals_base_at_init(name):
    base, model = adapted(name)
    ids = ids_batch()
    expected = logits(base, ids)
    torch.testing.assert_close(logits(model, ids), expected)
    # B starts at zero in every adapted layer (embedding layers start with A at zero instead)
    for _, layer in lorakit.lora_layers(model):
        delta = layer.delta_weight("default")
        assert torch.count_nonzero(delta) == 0


@pytest.mark.parametrize("name", list(MODELS))
def test_adapter_changes_output_and_disable_gives_base(name):
    base, model = adapted(name)
    randomise_b(model)
    ids = ids_batch()
    assert not torch.allclose(logits(model, ids), logits(base, ids))
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids))


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_with_an_adapter_equals_the_merged_model(name):
    base, model = adapted(name)
    randomise_b(model)
    prompt = ids_batch()
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base_tokens = base.generate(prompt, **settings)
        tokens = model.generate(prompt, **settings)
    assert tokens.shape == (BATCH, SEQ + NEW_TOKENS)
    assert torch.equal(tokens[:, :SEQ], prompt)
    assert not torch.equal(tokens, base_tokens), "the adapter should change greedy choices"
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(merged.generate(prompt, **settings), tokens)
    # generating with the merged-in adapter (not unloaded) gives the same tokens too
    lorakit.merge(model)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **settings), tokens)


@pytest.mark.parametrize("name", list(MODELS))
def test_merge_and_unload_matches_and_gives_back_the_base_keys(name):
    base, model = adapted(name)
    randomise_b(model)
    ids = ids_batch()
    expected = logits(model, ids)
    base_keys = list(base.state_dict().keys())
    merged = lorakit.merge_and_unload(model)
    assert list(merged.state_dict().keys()) == base_keys
    assert type(merged) is type(base)
    assert not any(
        isinstance(m, (lorakit.layers.LoraLayer, lorakit.layers.SavedModule))
        for m in merged.modules()
    )
    torch.testing.assert_close(logits(merged, ids), expected)
    # the merged weights load into a fresh base with strict key checking
    fresh = MODELS[name][0]().eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(logits(fresh, ids), expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_state_dict_loads_into_a_fresh_base(name):
    base, model = adapted(name)
    randomise_b(model)
    ids = ids_batch()
    state = lorakit.merged_state_dict(model)
    assert list(state.keys()) == list(base.state_dict().keys())
    fresh = MODELS[name][0]().eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_half_precision_bases(name, dtype):
    base, model = adapted(name, dtype)
    randomise_b(model)
    ids = ids_batch()
    # adapters are kept in float32 on a half base; the base weights keep their dtype
    for _, layer in lorakit.lora_layers(model):
        assert layer.weight.dtype == dtype
        assert layer.lora_A["default"].dtype == layer.lora_B["default"].dtype == torch.float32
    out = logits(model, ids)
    assert out.dtype == dtype
    reference = logits(copy.deepcopy(model).float(), ids)  # the same weights, all in float32
    atol = HALF_EPS_FACTOR * torch.finfo(dtype).eps * reference.abs().max().item()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=atol)
    # merged into the half weights, the output stays within the same rounding
    merged = lorakit.merge_and_unload(model)
    assert all(p.dtype == dtype for p in merged.parameters())
    torch.testing.assert_close(logits(merged, ids).float(), reference, rtol=0, atol=atol)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_training_step_moves_only_the_adapters(name):
    base, model = adapted(name)
    model.train()
    adapter_ids = {id(p) for p in lorakit.adapter_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == adapter_ids
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = ids_batch()
    for _ in range(2):  # step 1 moves B (A's gradient is zero while B is); step 2 moves A too
        optimizer.zero_grad()
        if name == "roberta":
            loss = model(input_ids=ids, labels=torch.tensor([0, 2])).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert p.grad is None, f"{n} got a gradient"
            assert torch.equal(p, before[n]), f"{n} changed"
    # the base model handed in for copying was never touched
    for n, p in base.named_parameters():
        assert p.requires_grad, n
