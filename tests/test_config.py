"""LoraConfig: validation, immutability, and translation to and from PEFT's adapter_config.json."""

import dataclasses
import re
import warnings

import peft
import pytest

import lorakit
from lorakit import ConfigError, LoraConfig

# (field values, text the message must contain: the field and the offending value)
BAD_VALUES = [
    ({"r": 0}, "r=0"),
    ({"r": 1.5}, "r=1.5"),
    ({"r": True}, "r=True"),
    ({"alpha": -1}, "alpha=-1"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"bias": "some"}, "bias='some'"),
    ({"init": "xavier"}, "init='xavier'"),
    ({"use_rslora": "yes"}, "use_rslora='yes'"),
    ({"target_modules": "q_proj("}, "target_modules 'q_proj('"),
    ({"target_modules": []}, "target_modules=[]"),
    ({"target_modules": None}, "target_modules=None"),
    ({"exclude_modules": ["ok", ""]}, "exclude_modules=['ok', '']"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']=0"),
    ({"rank_pattern": {"[": 4}}, "rank_pattern key '['"),
    ({"alpha_pattern": {"q_proj": 0}}, "alpha_pattern['q_proj']=0"),
    ({"layers": [-1]}, "layers item -1"),
    ({"layers": [0, "1"]}, "layers item '1'"),
    ({"fused_slices": {"c_attn": (True,)}}, "fused_slices['c_attn']=(True,)"),
    ({"fused_slices": {"c_attn": (False, False)}}, "fused_slices['c_attn']=(False, False)"),
]

# The keys of PEFT's adapter_config.json that to_peft_dict writes and peft.LoraConfig must accept.
PEFT_FIELDS = [
    "r",
    "lora_alpha",
    "lora_dropout",
    "exclude_modules",
    "bias",
    "use_rslora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "modules_to_save",
    "use_dora",
    "lora_bias",
]


def test_defaults_are_valid():
    config = LoraConfig()
    assert (config.r, config.alpha, config.target_modules) == (8, 16, "all-linear")
    assert config.scaling(8, 16) == 2.0
    assert LoraConfig(use_rslora=True).scaling(16, 16) == 4.0


@pytest.mark.parametrize(("fields", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_each_wrong_value_is_a_config_error_naming_field_and_value(fields, named):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**fields)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)  # generic handlers keep working
    assert isinstance(info.value, lorakit.LorakitError)


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, alpha=-1, dropout=1.0, bias="some", init="xavier")
    message = str(info.value)
    assert "5 problems" in message
    for part in ("r=0", "alpha=-1", "dropout=1.0", "bias='some'", "init='xavier'"):
        assert part in message


def test_allowed_values_are_listed():
    with pytest.raises(ConfigError, match="none, all, lora_only"):
        LoraConfig(bias="some")
    with pytest.raises(ConfigError, match="kaiming, gaussian"):
        LoraConfig(init="xavier")


def test_config_is_frozen():
    config = LoraConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_modules = ["q_proj"]


def test_user_lists_and_dicts_are_copied():
    targets = ["q_proj", "v_proj"]
    ranks = {"q_proj": 4}
    alphas = {"v_proj": 32}
    slices = {"c_attn": [True, False, True]}
    layers = [0, 1]
    saved = ["classifier"]
    config = LoraConfig(
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        fused_slices=slices,
        layers=layers,
        modules_to_save=saved,
    )
    targets.append("k_proj")
    ranks["q_proj"] = 99
    ranks["k_proj"] = 2
    alphas.clear()
    slices["c_attn"][1] = True
    layers.append(5)
    saved.append("score")
    assert config.target_modules == ("q_proj", "v_proj")
    assert dict(config.rank_pattern) == {"q_proj": 4}
    assert dict(config.alpha_pattern) == {"v_proj": 32}
    assert dict(config.fused_slices) == {"c_attn": (True, False, True)}
    assert config.layers == (0, 1)
    assert config.modules_to_save == ("classifier",)


def test_config_mappings_are_read_only():
    config = LoraConfig(rank_pattern={"q_proj": 4}, fused_slices={"c_attn": (True, True)})
    with pytest.raises(TypeError):
        config.rank_pattern["q_proj"] = 8
    with pytest.raises(TypeError):
        config.alpha_pattern["v_proj"] = 8
    with pytest.raises(TypeError):
        config.fused_slices["c_attn"] = (False, True)


def test_replace_validates_again_and_leaves_the_original():
    config = LoraConfig(r=8)
    assert config.replace(r=4).r == 4
    assert config.r == 8
    with pytest.raises(ConfigError, match="r=0"):
        config.replace(r=0)


def test_from_dict_round_trip_and_unknown_key_lists_valid_keys():
    config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, layers=[1])
    assert LoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_dict({"r": 4, "rank": 4, "lora_alpha": 8})
    message = str(info.value)
    assert "'lora_alpha'" in message and "'rank'" in message
    valid = message.split("valid keys:")[1]
    for field in dataclasses.fields(LoraConfig):
        assert re.search(rf"\b{field.name}\b", valid)


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(),
        LoraConfig(
            r=4,
            alpha=8,
            dropout=0.1,
            target_modules=["v_proj", "q_proj"],
            exclude_modules=["lm_head"],
            bias="lora_only",
            init="gaussian",
            use_rslora=True,
            rank_pattern={"q_proj": 2},
            alpha_pattern={"v_proj": 32},
            layers=[0, 2],
            modules_to_save=["classifier"],
        ),
        LoraConfig(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.0\..*"),
    ],
    ids=["defaults", "every-field", "regexes"],
)
def test_peft_dict_round_trip(config):
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own keys must not look unknown
        assert LoraConfig.from_peft_dict(data) == config


def test_real_peft_config_accepts_our_keys():
    config = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["lm_head"],
        use_rslora=True,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
        layers=[0, 1],
        modules_to_save=["classifier"],
    )
    data = config.to_peft_dict()
    theirs = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert theirs.peft_type == peft.PeftType.LORA
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    assert set(theirs.exclude_modules) == {"lm_head"}  # PEFT keeps name lists as sets
    for key in PEFT_FIELDS:
        if key == "exclude_modules":
            continue
        assert getattr(theirs, key) == data[key], key
    # and what PEFT writes back reads as the same config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # newer PEFT keys lorakit does not know
        back = LoraConfig.from_peft_dict(theirs.to_dict())
    assert back == config


def test_real_peft_config_accepts_regex_and_gaussian():
    config = LoraConfig(target_modules=r".*\.(q|v)_proj", init="gaussian")
    data = config.to_peft_dict()
    theirs = peft.LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert theirs.target_modules == r".*\.(q|v)_proj"
    assert theirs.init_lora_weights == "gaussian"


def test_to_peft_dict_refuses_fused_slices():
    config = LoraConfig(target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)})
    with pytest.raises(ConfigError, match="fused_slices"):
        config.to_peft_dict()


@pytest.mark.parametrize("targets", ["all-linear", r".*\.q_proj"])
def test_to_peft_dict_refuses_layers_with_a_string_target(targets):
    """PEFT itself refuses layers_to_transform with a string target_modules."""
    config = LoraConfig(target_modules=targets, layers=[0])
    with pytest.raises(ValueError, match="layers_to_transform"):
        peft.LoraConfig(target_modules=targets, layers_to_transform=[0])
    with pytest.raises(ConfigError, match=r"layers=\[0\] with target_modules="):
        config.to_peft_dict()
    # with a list of names the same layers filter is fine in PEFT's format
    assert LoraConfig(target_modules=["q_proj"], layers=[0]).to_peft_dict()["layers_to_transform"]


def test_from_peft_dict_warns_on_unknown_keys():
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "brand_new_option": 1}
    with pytest.warns(UserWarning, match="brand_new_option"):
        config = LoraConfig.from_peft_dict(data)
    assert config.r == 4


@pytest.mark.parametrize(
    ("key", "value", "feature"),
    [
        ("use_qalora", True, "QA-LoRA"),
        ("lora_bias", True, "bias on lora_B"),
        ("layer_replication", [[0, 1]], "layer replication"),
    ],
)
def test_from_peft_dict_refuses_features_lorakit_lacks(key, value, feature):
    data = {"r": 4, "target_modules": ["q_proj"], key: value}
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_peft_dict(data)
    assert f"{key}={value!r}" in str(info.value)
    assert feature in str(info.value)
    # switched off, the same key is fine
    assert LoraConfig.from_peft_dict({**data, key: False if value is True else None}).r == 4


def test_from_peft_dict_refuses_other_peft_types_and_bad_values():
    with pytest.raises(ConfigError, match="peft_type='IA3'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(ConfigError, match="init_lora_weights='eva'"):
        LoraConfig.from_peft_dict({"target_modules": ["q_proj"], "init_lora_weights": "eva"})
    source = "my_adapter/adapter_config.json"
    with pytest.raises(ConfigError, match=r"my_adapter/adapter_config\.json: .*r=0"):
        LoraConfig.from_peft_dict({"r": 0, "target_modules": ["q"]}, source)


def test_name_lists_are_normalised_to_one_canonical_form():
    """Order and duplicates do not matter (PEFT stores names as a set): configs compare equal."""
    listed = LoraConfig(target_modules=["v_proj", "q_proj", "v_proj"])
    as_set = LoraConfig(target_modules={"q_proj", "v_proj"})
    assert listed == as_set
    assert listed.target_modules == ("q_proj", "v_proj")


# -- patterns that could backtrack for ever are refused when the config is built ---------------
# Each of these takes exponential time (or a high power of the path length) to fail to match a
# module path such as "model.layers.0.self_attn.q_proj"; "(.+)+x" never finishes there.
HANGING_PATTERNS = {
    "(.+)+x": "nested repetition",
    "(a+)+$": "nested repetition",
    "(a*)*b": "nested repetition",
    r"(\w+\.?)+$$": "nested repetition",
    "(.*a){12}": "nested repetition",
    "(a?){30}a{30}": "nested repetition",
    "(.|.)*x": "alternation",
    "(a|aa)+$": "alternation",
    ".*.*.*.*.*.*.*x": "7 repeated or optional parts",
    "a?" * 30 + "a" * 30: "30 repeated or optional parts",
    "q" * 5000: "5,000 characters",
}
# What PEFT users write (PEFT's documentation and model cards).
ORDINARY_PATTERNS = [
    r".*\.(q_proj|v_proj)$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$",
    r"^(?!.*lm_head).*",
    r".*(q_proj|v_proj)",
    r"(model\.)?layers\.(0|1|2|3|10|11)\.(self_attn|mlp)\.\w+_proj",
]


@pytest.mark.parametrize("pattern, why", HANGING_PATTERNS.items(), ids=range(len(HANGING_PATTERNS)))
@pytest.mark.parametrize(
    "field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"]
)
def test_a_pattern_that_could_hang_is_a_config_error_naming_it(field, pattern, why):
    value = {pattern: 4} if field.endswith("_pattern") else pattern
    with pytest.raises(ConfigError) as caught:
        LoraConfig(**{field: value})
    message = str(caught.value)
    assert field in message and repr(pattern)[:40] in message and why in message, message


@pytest.mark.parametrize("pattern", list(HANGING_PATTERNS)[:3])
def test_a_pattern_that_could_hang_is_refused_in_an_adapter_config(pattern):
    data = LoraConfig(target_modules=["q_proj"]).to_peft_dict()
    with pytest.raises(ConfigError, match=r"adapter_config\.json.*nested repetition"):
        LoraConfig.from_peft_dict({**data, "target_modules": pattern})


@pytest.mark.parametrize("pattern", ORDINARY_PATTERNS)
def test_ordinary_patterns_are_accepted_everywhere(pattern):
    config = LoraConfig(
        target_modules=pattern,
        exclude_modules=pattern,
        rank_pattern={pattern: 4},
        alpha_pattern={pattern: 8},
    )
    assert LoraConfig.from_peft_dict(config.to_peft_dict()) == config
