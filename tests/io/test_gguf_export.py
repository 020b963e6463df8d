"""GGUF export: llama.cpp (llama-cpp-python) gives lorakit's logits for exported adapters and
merged models; the file holds what llama.cpp's format says; what GGUF cannot hold is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_gguf import PROMPT, add_tiny_vocab, llama_cpp, llama_logits, write_base

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.io import read_adapter
from lorakit.io.gguf_export import export_gguf
from lorakit.io.gguf_names import permute_rows, unpermute_rows
from tiny_models import LLAMA, randomise, tiny_gpt2, tiny_llama

# llama.cpp computes in float32 in its own order (blocked dot products, its own softmax and
# RMSNorm): logits of order 1 agree to a few 1e-6; 1e-4 leaves room for other CPUs' kernels.
TOL = dict(atol=1e-4, rtol=1e-4)

CASES = {
    "plain": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "rslora": LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear"),
    "rank_pattern": LoraConfig(
        r=4,
        alpha=8,
        target_modules="all-linear",
        rank_pattern={"k_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 6},
    ),
    "alpha_pattern": LoraConfig(
        r=4,
        alpha=8,
        target_modules="all-linear",
        alpha_pattern={"q_proj": 3.0, r"model\.layers\.1\.mlp\.up_proj": 40.0},
    ),
    "embedding": LoraConfig(r=4, alpha=4, target_modules=["embed_tokens", "q_proj", "k_proj"]),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny Llama as a transformers directory and as a float32 GGUF, written once."""
    directory = tmp_path_factory.mktemp("gguf_base")
    hf_dir, gguf_path = write_base(tiny_llama(), directory)
    return hf_dir, gguf_path


def adapted(config: LoraConfig, directory, gentle: bool = False):
    """The tiny Llama with a random adapter, saved to ``directory / "adapter"``; its logits.
    ``gentle``: factors a quarter as large (the adapter still moves the logits by about half
    their size), so that rounding the merged weights to 16 or 8 bits does not flip the tiny
    random model's top tokens."""
    model = randomise(lorakit.apply_lora(tiny_llama(), config))
    if gentle:
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model):
                p.mul_(0.25)
    lorakit.save_adapter(model, directory / "adapter")
    with torch.no_grad():
        out = model(torch.tensor([PROMPT])).logits[0]
    return directory / "adapter", out


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_applies_the_exported_adapter_as_lorakit_does(case, base, tmp_path):
    hf_dir, gguf_base = base
    adapter, expected = adapted(CASES[case], tmp_path)
    out = export_gguf(adapter, tmp_path / "adapter.gguf", base=hf_dir)
    got = llama_logits(gguf_base, lora=out)
    without = llama_logits(gguf_base)
    assert (expected - without).abs().max() > 100 * TOL["atol"]  # the adapter matters
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_file_holds_llama_cpps_keys_names_and_exact_folded_scales(base, tmp_path):
    import gguf

    hf_dir, gguf_base = base
    config = CASES["rank_pattern"].replace(use_rslora=True, alpha_pattern={"v_proj": 5.0})
    adapter, _ = adapted(config, tmp_path)
    out = export_gguf(adapter, tmp_path / "a.gguf", base=gguf_base)  # a GGUF base works too
    reader = gguf.GGUFReader(out)
    field = {f.name: f.contents() for f in reader.fields.values()}
    assert field["general.type"] == "adapter"
    assert field["adapter.type"] == "lora"
    assert field["general.architecture"] == "llama"
    alpha = field["adapter.lora.alpha"]
    assert alpha == 4.0  # the most common rank: llama.cpp's alpha / r is 1 for those tensors
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    file = read_adapter(adapter).tensors
    prefix = "base_model.model.model.layers."
    for layer, module, gguf_module, r, s_alpha in [
        (1, "mlp.down_proj", "ffn_down", 6, 8.0),
        (0, "self_attn.v_proj", "attn_v", 4, 5.0),
        (1, "self_attn.k_proj", "attn_k", 2, 8.0),
    ]:
        a = file[f"{prefix}{layer}.{module}.lora_A.weight"].double()
        b = file[f"{prefix}{layer}.{module}.lora_B.weight"].double()
        if gguf_module == "attn_k":  # llama.cpp's rotation pairs: k's rows permuted per kv head
            b = permute_rows(b, 2)
        scale = s_alpha / math.sqrt(r)  # rsLoRA, the module's own rank and alpha
        name = f"blk.{layer}.{gguf_module}.weight"
        # ggml's shapes are torch's reversed: A (r, in) is ne [in, r]; B (out, r) is ne [r, out]
        assert tensors[name + ".lora_a"].shape == a.shape
        assert tensors[name + ".lora_b"].shape == b.shape
        torch.testing.assert_close(tensors[name + ".lora_a"], a.float(), atol=0, rtol=0)
        folded = (b * scale * r / alpha).float()
        torch.testing.assert_close(tensors[name + ".lora_b"], folded, atol=0, rtol=0)
        # llama.cpp's scale: alpha / (lora_b's column count)
        torch.testing.assert_close(
            alpha / r * tensors[name + ".lora_b"].double() @ a, scale * b @ a, atol=1e-6, rtol=0
        )


def test_permutation_reorders_halves_to_pairs_and_back():
    rows = torch.arange(2 * 8).reshape(16, 1)  # 2 heads of 8 rows
    permuted = permute_rows(rows, 2)[:, 0].tolist()
    # head 0: halves [0..3] and [4..7] interleave to pairs (0,4), (1,5), ...
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute_rows(permute_rows(rows, 2), 2), rows)


# The merged model's weights are rounded once to the file's type and llama.cpp rounds the
# activations it multiplies them with to the same type; logits of size about 0.15 then differ
# from lorakit's float32 by (measured, largest) 1.3e-6 (f32), 3.3e-4 (f16), 2.6e-3 (bf16: 8-bit
# mantissas) and 1.2e-2 (q8_0: int8 codes, one scale per 32 values): bounds about 4x those.
@pytest.mark.parametrize(
    ("out_type", "atol"), [("f32", 1e-5), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 5e-2)]
)
def test_llama_cpp_runs_the_merged_model_as_lorakit(out_type, atol, base, tmp_path):
    hf_dir, gguf_base = base
    adapter, expected = adapted(CASES["alpha_pattern"], tmp_path, gentle=True)
    out = export_gguf(
        adapter, tmp_path / "merged.gguf", base=gguf_base, merged=True, out_type=out_type
    )
    got = llama_logits(out)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_merged_from_a_directory_base_matches_the_gguf_route(base, tmp_path):
    pytest.importorskip("tokenizers")
    hf_dir, gguf_base = base
    adapter, expected = adapted(CASES["rslora"], tmp_path)
    _save_byte_level_tokenizer(hf_dir, vocab_size=tiny_llama().config.vocab_size)
    out = export_gguf(adapter, tmp_path / "m.gguf", base=hf_dir, merged=True, out_type="f32")
    torch.testing.assert_close(llama_logits(out), expected, **TOL)
    llm = llama_cpp().Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        tokens = llm.tokenize(b"!<|end|>", add_bos=False, special=True)
    finally:
        llm.close()
    assert tokens == [0, tiny_llama().config.vocab_size - 1]


def _save_byte_level_tokenizer(directory, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json of ``vocab_size`` tokens (bytes, then a few merges)."""
    if (directory / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    chars = sorted(alphabet)[: vocab_size - 3]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [(chars[0], chars[1]), (chars[2], chars[3])]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|end|>"])  # the last id: matched whole, as a control token
    tokenizer.save(str(directory / "tokenizer.json"))


def test_what_gguf_cannot_hold_is_refused_with_the_merged_route(base, tmp_path):
    hf_dir, _ = base
    dora, _ = adapted(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "d")
    with pytest.raises(AdapterFileError, match=r"(?s)--merged.*DoRA"):
        export_gguf(dora, tmp_path / "d.gguf", base=hf_dir)
    saved, _ = adapted(
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), tmp_path / "s"
    )
    with pytest.raises(AdapterFileError, match=r"whole tensors \(lm_head.weight\)"):
        export_gguf(saved, tmp_path / "s.gguf", base=hf_dir)
    config = json.loads((saved / "adapter_config.json").read_text())
    config.update(init_lora_weights="pissa", modules_to_save=None)
    pissa = tmp_path / "p" / "adapter"
    pissa.mkdir(parents=True)
    (pissa / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in read_adapter(saved).tensors.items() if "lora_" in k}
    from safetensors.torch import save_file

    save_file(tensors, pissa / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=r"init_lora_weights='pissa'.*rewritten base"):
        export_gguf(pissa, tmp_path / "p.gguf", base=hf_dir)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_dora_adapter_merges_exactly(base, tmp_path):
    _, gguf_base = base
    adapter, expected = adapted(
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True), tmp_path
    )
    out = export_gguf(adapter, tmp_path / "m.gguf", base=gguf_base, merged=True, out_type="f32")
    torch.testing.assert_close(llama_logits(out), expected, **TOL)


def test_other_architectures_and_a_tied_output_are_refused_by_name(base, tmp_path):
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    adapter, _ = adapted(CASES["plain"], tmp_path)
    with pytest.raises(ConfigError, match=r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        export_gguf(adapter, tmp_path / "x.gguf", base=gpt2)
    tied = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(tied)
    head, _ = adapted(LoraConfig(r=2, target_modules=["lm_head"]), tmp_path / "h")
    with pytest.raises(AdapterFileError, match=r"lm_head: the base's GGUF has no tensor output"):
        export_gguf(head, tmp_path / "h.gguf", base=tied)
    with pytest.raises(ConfigError, match=r"out_type='q4_0': expected one of f32, f16"):
        export_gguf(adapter, tmp_path / "x.gguf", base=tied, out_type="q4_0")


def test_the_command_writes_both_files_and_names_its_flags(base, tmp_path, capsys):
    from lorakit.cli.main import main

    hf_dir, gguf_base = base
    adapter, expected = adapted(CASES["plain"], tmp_path, gentle=True)
    out = tmp_path / "a.gguf"
    assert main(["export-gguf", str(adapter), str(out), "--base", str(gguf_base)]) == 0
    assert "llama.cpp LoRA adapter (llama, 14 tensor pairs, alpha 4)" in capsys.readouterr().out
    merged = tmp_path / "m.gguf"
    argv = ["export-gguf", "--merged", str(hf_dir), str(adapter), str(merged), "--outtype", "bf16"]
    _save_byte_level_tokenizer(hf_dir, vocab_size=tiny_llama().config.vocab_size)
    assert main(argv) == 0
    assert "merged llama model" in capsys.readouterr().out
    # bfloat16 weights and activations: as in test_llama_cpp_runs_the_merged_model_as_lorakit
    torch.testing.assert_close(llama_logits(merged), expected, atol=1e-2, rtol=0)
    assert main(["export-gguf", str(adapter), str(out), "--base", str(gguf_base)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["export-gguf", str(hf_dir), str(adapter), str(out)]) == 2
    assert "expected ADAPTER OUT.gguf, got 3 path(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_the_embedded_model_with_an_exported_adapter_in_llama_cpp(tmp_path):
    """SmolLM2-135M (its Q4_1 GGUF, as lorakit loads it: dequantized to float32) with a random
    q/k/v/o adapter: llama.cpp on the float32 base written by the merged route (an untrained
    adapter, B = 0, merges to the base itself) plus the exported adapter, and on the merged model,
    against lorakit."""
    from lorakit.models import load_model

    model, tokenizer = load_model(None)
    config = LoraConfig(r=8, alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"])
    config = config.replace(alpha_pattern={"v_proj": 4.0}, rank_pattern={"o_proj": 4})
    config = config.replace(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    lorakit.apply_lora(model, config, "zero")
    lorakit.save_adapter(model, tmp_path / "zero", "zero")
    lorakit.delete_adapter(model, "zero")
    lorakit.apply_lora(model, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    lorakit.save_adapter(model, tmp_path / "adapter")
    tokens = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0]
    base = export_gguf(tmp_path / "zero", tmp_path / "base.gguf", merged=True, out_type="f32")
    adapter = export_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf")
    merged = export_gguf(tmp_path / "adapter", tmp_path / "m.gguf", merged=True, out_type="f32")
    # 30 layers of float32 in two orders: logits of size about 10 agree to about 1e-3
    for got in (llama_logits(base, tokens, lora=adapter), llama_logits(merged, tokens)):
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-3)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_fast_reader_reads_what_gguf_reads(base, tmp_path):
    import gguf
    import numpy as np

    from lorakit.io.gguf_read import read_gguf

    _, gguf_base = base
    adapter, _ = adapted(CASES["embedding"], tmp_path)
    out = export_gguf(adapter, tmp_path / "m.gguf", base=gguf_base, merged=True, out_type="q8_0")
    for path in (gguf_base, out):
        reference, ours = gguf.GGUFReader(path), read_gguf(path)
        for key, field in reference.fields.items():
            if not key.startswith("GGUF."):
                assert ours.value(key) == field.contents(), key
        assert len(ours.tensors) == len(reference.tensors)
        for theirs, mine in zip(reference.tensors, ours.tensors):
            assert (mine.name, mine.tensor_type) == (theirs.name, theirs.tensor_type)
            assert mine.shape == tuple(int(n) for n in reversed(theirs.shape))
            assert np.array_equal(mine.data.reshape(-1), theirs.data.view(np.uint8).reshape(-1))


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_qwen2_and_mistral_bases_in_llama_cpp(family, tmp_path):
    """Qwen2 (llama.cpp's qwen2: NeoX rotation, no permutation, q/k/v biases) and Mistral (its
    llama, permuted) with an rsLoRA adapter on every linear layer, and merged."""
    import transformers

    model_class = getattr(transformers, f"{family}ForCausalLM")
    config_class = getattr(transformers, f"{family}Config")

    def build():
        torch.manual_seed(0)
        return model_class(config_class(**LLAMA)).eval()

    hf_dir, gguf_base = write_base(build(), tmp_path)
    config = LoraConfig(r=4, alpha=8, use_rslora=True, target_modules="all-linear")
    model = randomise(lorakit.apply_lora(build(), config))
    lorakit.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    out = export_gguf(tmp_path / "adapter", tmp_path / "a.gguf", base=hf_dir)
    torch.testing.assert_close(llama_logits(gguf_base, lora=out), expected, **TOL)
    merged = export_gguf(
        tmp_path / "adapter", tmp_path / "m.gguf", base=gguf_base, merged=True, out_type="f32"
    )
    torch.testing.assert_close(llama_logits(merged), expected, **TOL)


def test_an_adapter_written_by_combine_in_llama_cpp(base, tmp_path):
    """``combine`` ("cat") writes per-layer ranks (6 where both adapters are, 4 elsewhere) with
    alpha = r per layer in rank_pattern / alpha_pattern; llama.cpp's converter would read one
    lora_alpha for all of them."""
    hf_dir, gguf_base = base
    model = lorakit.apply_lora(tiny_llama(), CASES["rslora"], "a")
    lorakit.apply_lora(model, LoraConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj"]), "b")
    randomise(model)
    lorakit.combine(model, {"a": 0.7, "b": 0.5}, "cat", "both")
    lorakit.set_adapter(model, "both")
    lorakit.save_adapter(model, tmp_path / "both", "both")
    saved = json.loads((tmp_path / "both" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    out = export_gguf(tmp_path / "both", tmp_path / "both.gguf", base=hf_dir)
    torch.testing.assert_close(llama_logits(gguf_base, lora=out), expected, **TOL)


# A and B rounded to the file's type (and llama.cpp's activations with them): measured largest
# logit differences (logits up to 0.53) 2.5e-4 (f16), 3.2e-3 (bf16), 1.1e-2 (q8_0, whose B rows
# of 32 are q8_0 blocks too); bounds 4x those.
@pytest.mark.parametrize(("out_type", "atol"), [("f16", 1e-3), ("bf16", 1.3e-2), ("q8_0", 4e-2)])
def test_an_adapter_file_in_16_or_8_bits(out_type, atol, base, tmp_path):
    hf_dir, gguf_base = base
    config = LoraConfig(r=32, alpha=64, target_modules="all-linear")
    adapter, expected = adapted(config, tmp_path, gentle=True)
    out = export_gguf(adapter, tmp_path / "a.gguf", base=hf_dir, out_type=out_type)
    got = llama_logits(gguf_base, lora=out)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_an_adapter_of_another_base_is_refused_unless_allowed(base, tmp_path):
    """The fingerprint check of load_adapter, computed from the base's files: a float GGUF or a
    directory by its weights, a quantized GGUF (the usual llama.cpp base) by its shapes."""
    from lorakit.io.gguf_model import write_model_gguf

    hf_dir, gguf_base = base
    adapter, _ = adapted(CASES["plain"], tmp_path)
    other_dir, other_gguf = write_base(tiny_llama(seed=1), tmp_path / "other")
    for other in (other_dir, other_gguf):
        with pytest.raises(AdapterFileError, match=r"(?s)another base model.*weights differ"):
            export_gguf(adapter, tmp_path / "x.gguf", base=other)
    with pytest.warns(UserWarning, match="exporting it anyway"):
        export_gguf(adapter, tmp_path / "x.gguf", base=other_gguf, allow_base_mismatch=True)
    config = json.loads((hf_dir / "config.json").read_text())
    quantized = tmp_path / "q8_0.gguf"
    state = {k: v.detach() for k, v in tiny_llama().state_dict().items()}
    vocab = config["vocab_size"]
    write_model_gguf(quantized, config, state, lambda w: add_tiny_vocab(w, vocab), "q8_0")
    export_gguf(adapter, tmp_path / "y.gguf", base=quantized)  # the same shapes: accepted
    with pytest.raises(AdapterFileError, match=r"(?s)another base model.*weights differ"):
        export_gguf(adapter, tmp_path / "z.gguf", base=other_gguf, merged=True)
