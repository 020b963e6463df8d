"""Code written for PEFT: its ``LoraConfig`` objects in ``apply_lora`` (converted, checked against
PEFT's own ``get_peft_model`` on the same model), PEFT's field names in lorakit's ``LoraConfig``
(an error naming lorakit's field), and transformers' adapter methods on a lorakit-adapted model.
Outputs against PEFT at ``assert_close``'s default tolerances (PEFT orders the float32 operations
differently)."""

import copy
import pickle

import peft
import pytest
import torch

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig
from lorakit.config import UnknownFieldError
from tiny_models import LLAMA, logits, randomise, tiny_bert, tiny_llama, tokens


# -- PEFT's names in lorakit's LoraConfig ---------------------------------------------------------
def test_peft_field_names_are_an_error_naming_lorakits_field():
    with pytest.raises(
        UnknownFieldError, match="'lora_alpha' is PEFT's name: lorakit's field is 'alpha'"
    ):
        LoraConfig(r=16, lora_alpha=32)
    with pytest.raises(TypeError, match="'lora_dropout' .* 'dropout'"):  # Python's kind of error
        LoraConfig().replace(lora_dropout=0.1)
    with pytest.raises(ConfigError, match="'task_type' is a PEFT field .* peft.LoraConfig"):
        LoraConfig(task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="'rank' is not a field. Fields: r, alpha, dropout"):
        LoraConfig(rank=4)
    assert LoraConfig(r=16, alpha=32).alpha == 32


# -- peft.LoraConfig in apply_lora ---------------------------------------------------------------
def _peft_reference(build, config):
    """PEFT's own model for the same base and config: its trainable parameter count."""
    theirs = peft.get_peft_model(build(), copy.deepcopy(config))
    return theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    "build, config",
    [
        (
            tiny_llama,
            peft.LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "o_proj"],
                lora_dropout=0.05,
                bias="none",
                task_type="CAUSAL_LM",
                use_rslora=True,
            ),
        ),
        (tiny_llama, peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM")),  # PEFT's targets
        (tiny_bert, peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS")),  # + the classifier
    ],
    ids=["llama listed targets", "llama default targets", "bert sequence classification"],
)
def test_a_peft_config_adapts_as_peft_does(build, config, tmp_path):
    before = config.to_dict()
    ours = randomise(lorakit.apply_lora(build(), config))
    assert config.to_dict() == before  # the user's object is not changed
    assert lorakit.count_parameters(ours)[0] == _peft_reference(build, config)
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path / "a")).eval()
    x = tokens(ours.config.vocab_size)
    torch.testing.assert_close(logits(theirs, x), logits(ours.eval(), x))
    made = lorakit.adapter_configs(ours)["default"]
    assert (made.r, made.alpha, made.dropout) == (config.r, config.lora_alpha, config.lora_dropout)


def test_the_default_targets_are_peft_s_for_the_architecture():
    model = lorakit.apply_lora(tiny_llama(), peft.LoraConfig(r=2))
    assert lorakit.adapter_configs(model)["default"].target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    "config, field",
    [
        (peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (
            peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
            "trainable_token_indices",
        ),
        (
            peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2]]),
            "layer_replication",
        ),
        (
            peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva"),
            "init_lora_weights",
        ),
        (peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "=False"),
        (peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "peft_type"),
    ],
    ids=["lora_bias", "trainable tokens", "layer replication", "eva init", "random B", "IA3"],
)
def test_peft_features_lorakit_lacks_are_refused_by_name(config, field):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=field):
        lorakit.apply_lora(model, config)
    assert lorakit.list_adapters(model) == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_config_of_another_kind_is_refused():
    with pytest.raises(
        ConfigError, match="config is a builtins.dict; expected a lorakit.LoraConfig"
    ):
        lorakit.apply_lora(tiny_llama(), {"r": 4})


def test_no_default_targets_for_an_unknown_architecture_is_an_error():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="target_modules=None.*model_type=None"):
        lorakit.apply_lora(net, peft.LoraConfig(r=2))


# -- transformers' adapter methods on a lorakit-adapted model -----------------------------------
@pytest.fixture
def two_adapters():
    model = lorakit.apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lorakit.apply_lora(model, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    return randomise(model)


def test_set_adapter_and_active_adapters_use_lorakits_adapters(two_adapters):
    model, x = two_adapters, tokens(LLAMA["vocab_size"])
    assert model.active_adapters() == ["b"]  # the last one applied
    model.set_adapter("a")
    assert lorakit.active_adapter(model) == "a" and model.active_adapters() == ["a"]
    with_a = logits(model, x)
    lorakit.set_adapter(model, "b")
    assert model.active_adapters() == ["b"]
    assert not torch.equal(logits(model, x), with_a)
    model.set_adapter(["a"])  # PEFT's list form, of one adapter
    torch.testing.assert_close(logits(model, x), with_a, rtol=0, atol=0)
    with pytest.raises(AdapterError, match="no adapter named 'c'.*adapters: a, b"):
        model.set_adapter("c")
    with pytest.raises(AdapterError, match="lorakit.adapter_per_row"):
        model.set_adapter(["a", "b"])
    model.delete_adapter("b")
    assert lorakit.list_adapters(model) == ["a"]


@pytest.mark.parametrize(
    "call, lorakit_call",
    [
        (lambda m: m.load_adapter("somewhere"), "lorakit.load_adapter"),
        (lambda m: m.add_adapter(peft.LoraConfig(r=2)), "lorakit.apply_lora"),
        (lambda m: m.disable_adapters(), "lorakit.disable_adapters"),
        (lambda m: m.enable_adapters(), "lorakit.disable_adapters"),
        (lambda m: m.get_adapter_state_dict(), "lorakit.save_adapter"),
        (lambda m: m.enable_peft_hotswap(target_rank=8), "lorakit.hotswap_adapter"),
    ],
    ids=["load_adapter", "add_adapter", "disable", "enable", "state dict", "hotswap"],
)
def test_transformers_other_adapter_methods_name_the_lorakit_call(two_adapters, call, lorakit_call):
    with pytest.raises(AdapterError, match=f"lorakit adapters \\(a, b\\): use .*{lorakit_call}"):
        call(two_adapters)


def _raises_transformers_own_error(call):
    """transformers' method ran: its ValueError ("No adapter loaded", or with this PEFT version
    "The version of PEFT you are using is not compatible"), not one of lorakit's."""
    with pytest.raises(ValueError) as raised:
        call()
    assert not isinstance(raised.value, lorakit.LorakitError)


def test_the_methods_belong_to_the_adapted_model_only(two_adapters):
    other = tiny_llama()  # the class is untouched: transformers' own method and message
    _raises_transformers_own_error(other.active_adapters)
    for twin in (copy.deepcopy(two_adapters), pickle.loads(pickle.dumps(two_adapters))):
        twin.set_adapter("a")  # a copy's methods act on the copy
        assert lorakit.active_adapter(twin) == "a" and lorakit.active_adapter(two_adapters) == "b"
        with pytest.raises(AdapterError, match="lorakit.load_adapter"):
            twin.load_adapter("somewhere")


def test_without_lorakit_adapters_the_methods_are_transformers_own(two_adapters, tmp_path):
    merged = lorakit.merge_and_unload(two_adapters)
    _raises_transformers_own_error(merged.active_adapters)
    merged.save_pretrained(tmp_path)  # the whole merged model, as transformers writes it
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
