"""PiSSA, OLoRA and LoftQ: inits that start A and B from the base weight and rewrite it.

References: PEFT 0.21's ``pissa_init`` / ``olora_init`` on the same weights (A, B and the residual
equal), the formulas themselves (W_res + s B A = W; LoftQ's algorithm written out here again with
lorakit's NF4, which ``tests/quant`` proves bit-compatible with bitsandbytes), and the base model's
own outputs.
"""

import copy

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterError, ConfigError
from lorakit.layers import init as base_init
from lorakit.quant import QuantizedWeight
from tiny_models import tiny_gpt2, tiny_llama, tokens

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["pissa", "pissa_niter_4", "olora"]
VOCAB = 128


def config(init: str, **extra) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "init": init, "target_modules": TARGETS, **extra})


def peft_model(base, cfg: LoraConfig):
    data = {k: v for k, v in cfg.to_peft_dict().items() if k != "peft_type"}
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**data))


def sgd_steps(model, x, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.eval()


# PEFT's olora_init factors a GPT-2 Conv1D's weight as stored, (in, out), untransposed, so its A
# (r, out) does not fit x; lorakit factors (out, in) as for every layer: GPT-2 only with PiSSA.
@pytest.mark.parametrize(
    "init, make",
    [("pissa", tiny_llama), ("olora", tiny_llama), ("pissa", tiny_gpt2)],
    ids=["llama-pissa", "llama-olora", "gpt2-pissa"],
)
def test_a_b_and_residual_equal_peft(init, make):
    base = make()
    targets = ["c_attn", "c_fc"] if make is tiny_gpt2 else TARGETS
    cfg = config(init, target_modules=targets)
    ours = lorakit.apply_lora(copy.deepcopy(base), cfg)
    theirs = peft_model(base, cfg)
    compared = 0
    for path, layer in lorakit.lora_layers(ours):
        other = theirs.get_submodule(f"base_model.model.{path}")
        torch.testing.assert_close(layer.lora_A["default"], other.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora_B["default"], other.lora_B["default"].weight)
        torch.testing.assert_close(layer.weight, other.base_layer.weight)
        assert layer.lora_B["default"].abs().sum() > 0
        compared += 1
    assert compared == (4 if make is tiny_gpt2 else 6)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_model_starts_equal_to_the_base(init, make):
    base = make()
    x = tokens(VOCAB)
    targets = ["c_attn", "c_proj"] if make is tiny_gpt2 else TARGETS
    ours = lorakit.apply_lora(copy.deepcopy(base), config(init, target_modules=targets))
    torch.testing.assert_close(ours(x).logits, base(x).logits)
    for _, layer in lorakit.lora_layers(ours):
        assert layer.lora_A["default"].abs().sum() > 0 and layer.lora_B["default"].abs().sum() > 0


def test_pissa_niter_finds_the_principal_subspace():
    """The randomised SVD is not bit-equal to the exact one: its s·B A is compared instead,
    and with 16 subspace iterations on a 64x64 matrix it is the top-r part to 1e-4."""
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    w = u @ torch.diag(0.7 ** torch.arange(64.0, dtype=torch.float64)) @ v.t()  # decaying
    exact_a, exact_b = base_init.pissa(w, 4, 2.0)
    fast_a, fast_b = base_init.pissa(w, 4, 2.0, niter=16)
    exact, fast = exact_b @ exact_a, fast_b @ fast_a
    assert (fast - exact).norm() / exact.norm() < 1e-4
    again_a, _ = base_init.pissa(w, 4, 2.0, niter=16)
    assert torch.equal(fast_a, again_a)  # a fixed seed: the same W gives the same start
    rng = torch.get_rng_state()
    base_init.pissa(w, 4, 2.0, niter=2)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's generator is left alone


@pytest.mark.parametrize("init", INITS)
def test_start_is_the_same_every_time(init):
    """What a resumed run needs: the same base gives the same A₀, B₀ and residual, bit for bit."""
    one = lorakit.apply_lora(tiny_llama(), config(init))
    torch.manual_seed(123)
    two = lorakit.apply_lora(tiny_llama(), config(init))
    for (_, a), (_, b) in zip(lorakit.lora_layers(one), lorakit.lora_layers(two), strict=True):
        assert torch.equal(a.weight, b.weight)
        assert torch.equal(a.lora_initial["default"].a0, b.lora_initial["default"].a0)


@pytest.mark.parametrize("init", INITS)
def test_saved_adapter_is_plain_lora_of_the_original_base(init, tmp_path):
    import json

    from lorakit.io import fingerprint as fp
    from lorakit.io.adapter import read_adapter

    base = tiny_llama()
    x = tokens(VOCAB)
    cfg = config(init, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4.0})
    ours = lorakit.apply_lora(copy.deepcopy(base), cfg)
    sgd_steps(ours, x)
    trained = ours(x).logits
    lorakit.save_adapter(ours, tmp_path / "a")

    data = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert data["init_lora_weights"] is True and "loftq_config" not in data
    assert (data["r"], data["lora_alpha"]) == (8, 16)
    assert data["rank_pattern"] == {"v_proj": 4} and data["alpha_pattern"] == {"down_proj": 8.0}
    file = read_adapter(tmp_path / "a")
    paths = list(file.fingerprint["modules"])
    assert file.fingerprint == fp.fingerprint(base, paths)  # the untouched base's

    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(again(x).logits, trained)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(theirs(x).logits, trained)
    # the file loaded on the base keeps the base alone: no init ran on load
    assert all(base_init.base_change(layer) is None for _, layer in lorakit.lora_layers(again))


def test_rslora_conversion_keeps_the_scale(tmp_path):
    base = tiny_llama()
    x = tokens(VOCAB)
    ours = lorakit.apply_lora(
        copy.deepcopy(base), config("pissa", use_rslora=True, alpha_pattern={"v_proj": 3.0})
    )
    sgd_steps(ours, x)
    lorakit.save_adapter(ours, tmp_path / "a")
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(again(x).logits, ours(x).logits)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_on_the_residual_is_the_trained_model(init):
    x = tokens(VOCAB)
    ours = lorakit.apply_lora(tiny_llama(), config(init))
    sgd_steps(ours, x)
    trained = ours(x).logits
    merged = lorakit.merge_and_unload(ours)
    torch.testing.assert_close(merged(x).logits, trained)


@pytest.mark.parametrize("how", ["remove_lora", "delete_adapter"])
def test_taking_the_adapter_away_restores_the_original_weights(how):
    base = tiny_llama()
    ours = lorakit.apply_lora(copy.deepcopy(base), config("pissa"))
    sgd_steps(ours, tokens(VOCAB))
    plain = getattr(lorakit, how)(ours, *(["default"] if how == "delete_adapter" else []))
    for (name, p), (_, q) in zip(plain.named_parameters(), base.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert not list(lorakit.lora_layers(plain))


def test_a_failed_apply_puts_the_base_back(monkeypatch):
    import lorakit.injection as injection

    base = tiny_llama()
    ours = copy.deepcopy(base)

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(injection, "_set_trainable", fail)
    with pytest.raises(RuntimeError, match="boom"):
        lorakit.apply_lora(ours, config("olora"))
    for (name, p), (_, q) in zip(ours.named_parameters(), base.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not list(lorakit.lora_layers(ours))


def test_refusals_are_gathered_and_name_the_layers():
    base = tiny_llama()
    with pytest.raises(ConfigError) as e:
        lorakit.apply_lora(base, config("pissa", target_modules=["q_proj", "embed_tokens"]))
    assert "embed_tokens" in str(e.value) and "linear layers only" in str(e.value)
    assert not list(lorakit.lora_layers(base))
    with pytest.raises(ConfigError, match="use_dora"):
        lorakit.apply_lora(base, config("olora", use_dora=True))
    with pytest.raises(ConfigError, match="rank bound"):
        lorakit.apply_lora(base, config("pissa", r=65, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="fused slices"):
        lorakit.apply_lora(
            tiny_gpt2(),
            config(
                "pissa", target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
            ),
        )
    lorakit.apply_lora(base, config("pissa"), "first")
    with pytest.raises(ConfigError, match="two base-changing adapters"):
        lorakit.apply_lora(base, config("olora", target_modules=["q_proj"]), "second")


def test_a_tied_weight_is_refused():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tied to"):
        lorakit.apply_lora(model, config("pissa", target_modules=["lm_head"]))


def test_conv_is_refused():
    from tiny_models import conv_net

    with pytest.raises(ConfigError, match="conv"):
        lorakit.apply_lora(conv_net(), config("olora", target_modules=["conv1"]))


# -- on a 4-bit base: QPiSSA and LoftQ ---------------------------------------------------------
def relative_errors(model, original) -> tuple[float, float]:
    """(Σ ||W - (deq(Q) + s B A)||_F, Σ ||W - deq(quantize(W))||_F) over the adapted layers."""
    ours = plain = 0.0
    for path, layer in lorakit.lora_layers(model):
        w = original.get_submodule(path).weight.float()
        approx = layer.weight.dequantize(torch.float32) + layer.delta_weight("default")
        ours += float((w - approx).norm())
        plain += float((w - QuantizedWeight.quantize(w).dequantize(torch.float32)).norm())
    return ours, plain


def test_qpissa_quantizes_the_full_precision_residual_and_beats_plain_qlora(tmp_path):
    """QPiSSA as its paper makes it: PiSSA on the full-precision W, the residual quantized;
    ||W - (Q(W_res) + s B A)|| < ||W - Q(W)|| (a spread spectrum, as real layers have: the
    tiny model's random weights are nearly flat, so its layers get one)."""
    base = tiny_llama()
    with torch.no_grad():
        for _, module in base.named_modules():
            if isinstance(module, torch.nn.Linear):
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_(u @ torch.diag(s * 0.8 ** torch.arange(len(s))) @ vh)
    x = tokens(VOCAB)
    ours = lorakit.apply_lora(copy.deepcopy(base), config("pissa", r=8), quantize_base=True)
    for _, layer in lorakit.lora_layers(ours):
        assert isinstance(layer.weight, QuantizedWeight) and layer.weight.double_quant
    error, plain = relative_errors(ours, base)
    assert error < 0.5 * plain, (error, plain)
    with pytest.raises(AdapterError, match="quantized residual"):
        lorakit.delete_adapter(ours, "default")
    sgd_steps(ours, x)
    trained = ours(x).logits
    # converted: on W it gives W_res + s B A, the trained model without its residual's rounding
    lorakit.save_adapter(ours, tmp_path / "a")
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    rounding = (lorakit.quantize(copy.deepcopy(base))(x).logits - base(x).logits).abs().max()
    assert (again(x).logits - trained).abs().max() < rounding


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_on_a_quantized_base_the_residual_is_quantized_again(init):
    """As PEFT: the factors from the dequantized W, the residual quantized in the base's format;
    the model then starts within the two roundings of the quantized base."""
    base = tiny_llama()
    quantized = lorakit.quantize(copy.deepcopy(base), double_quant=False)
    x = tokens(VOCAB)
    before = quantized(x).logits
    ours = lorakit.apply_lora(quantized, config(init))
    for _, layer in lorakit.lora_layers(ours):
        assert isinstance(layer.weight, QuantizedWeight) and not layer.weight.double_quant
    start = ours(x).logits
    assert (start - before).abs().max() < 2 * (before - base(x).logits).abs().max()


def loftq_reference(w: torch.Tensor, r: int, s: float, iters: int):
    """LoftQ's Algorithm 1 in float64, quantizing with lorakit's NF4 (bnb-exact)."""
    residual = w.double()
    for step in range(iters):
        q = QuantizedWeight.quantize(residual.float(), "nf4", double_quant=True)
        u, sv, vh = torch.linalg.svd(w.double() - q.dequantize(torch.float32).double())
        low, high = u[:, :r] * sv[:r].sqrt(), sv[:r].sqrt()[:, None] * vh[:r]
        if step + 1 < iters:
            residual = w.double() - low @ high
    return q, high / s**0.5, low / s**0.5


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_matches_its_algorithm_and_reduces_the_error(iters):
    base = tiny_llama()
    ours = lorakit.apply_lora(copy.deepcopy(base), config("loftq", loftq_iter=iters))
    for path, layer in lorakit.lora_layers(ours):
        w = base.get_submodule(path).weight.detach()
        q, a, b = loftq_reference(w, 4, 2.0, iters)
        assert isinstance(layer.weight, QuantizedWeight)
        assert torch.equal(layer.weight.packed, q.packed)
        s_ba = 2.0 * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
        # float32 against float64 SVD of the same matrix
        torch.testing.assert_close(s_ba, 2.0 * b @ a, atol=1e-5, rtol=1e-4)
    error, plain = relative_errors(ours, base)
    assert error < plain


def test_loftq_refuses_a_quantized_base_and_unload():
    quantized = lorakit.quantize(tiny_llama())
    with pytest.raises(ConfigError, match="full-precision"):
        lorakit.apply_lora(quantized, config("loftq"))
    ours = lorakit.apply_lora(tiny_llama(), config("loftq"))
    with pytest.raises(AdapterError, match="quantized residual"):
        lorakit.remove_lora(ours)
    merged = lorakit.merge_and_unload(ours, requantize=True)
    assert all(type(m).__name__ != "LoraLinear" for m in merged.modules())


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_adapter_files(iters, tmp_path):
    """Saved as it is (init "loftq"): on the full-precision base LoftQ runs again and the model is
    the trained one; on lorakit.quantize(W) it loads as plain LoRA, exact when Q = quantize(W)
    (one iteration), refused by the fingerprint otherwise."""
    base = tiny_llama()
    x = tokens(VOCAB)
    ours = lorakit.apply_lora(copy.deepcopy(base), config("loftq", loftq_iter=iters))
    sgd_steps(ours, x)
    trained = ours(x).logits
    lorakit.save_adapter(ours, tmp_path / "a")
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(again(x).logits, trained)
    others = ["k_proj", "o_proj", "gate_proj", "up_proj"]  # LoftQ quantized only its targets
    quantized = lorakit.quantize(copy.deepcopy(base), skip=others)
    if iters == 1:
        on_q = lorakit.load_adapter(quantized, tmp_path / "a")
        torch.testing.assert_close(on_q(x).logits, trained)
    else:
        with pytest.raises(lorakit.errors.AdapterFileError, match="weights differ"):
            lorakit.load_adapter(quantized, tmp_path / "a")


# -- PEFT's files saved without conversion ------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_peft_file_saved_unconverted_starts_the_init_again(init, tmp_path):
    base = tiny_llama()
    x = tokens(VOCAB)
    theirs = peft_model(base, config(init))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "a")
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(ours(x).logits, theirs(x).logits)


def test_a_peft_niter_file_saved_unconverted_is_refused(tmp_path):
    base = tiny_llama()
    peft_model(base, config("pissa_niter_2")).save_pretrained(tmp_path / "a")
    with pytest.raises(lorakit.errors.AdapterFileError, match="path_initial_model_for_weight"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a")
