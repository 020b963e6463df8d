"""lorakit.plan: matching rules, errors that point at the fix, purity, the LoRA paper's counts."""

import time

import pytest
import torch
from torch import nn
from transformers import (
    DebertaV2Config,
    DebertaV2Model,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import lorakit
from lorakit import LoraConfig, TargetError, plan
from tiny_models import GPT2, LLAMA, tiny_bert

MLP = ("gate_proj", "up_proj", "down_proj")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The LoRA paper, Table 2: trainable parameters with Wq and Wv adapted.
ROBERTA_BASE_R8 = 294_912
ROBERTA_LARGE_R8 = 786_432
DEBERTA_XXL_R16 = 4_718_592
# GPT-3 175B (d_model 12288, 96 layers), r=4 on q and v: 96 layers x 2 matrices x r x (d + d).
GPT3_R4_QV = 96 * 2 * 4 * (12288 + 12288)
PLAN_SECONDS = 60  # a sanity bound: planning reads shapes only and should take well under a second


@pytest.fixture(scope="module")
def llama():
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


@pytest.fixture(scope="module")
def gpt2():
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


def paths(the_plan):
    return sorted(row.path for row in the_plan.rows)


def layer_paths(names, layers=(0, 1)):
    return sorted(
        f"model.layers.{i}.{'mlp' if n in MLP else 'self_attn'}.{n}" for i in layers for n in names
    )


# -- matching rules --------------------------------------------------------------------------------
def test_exact_names_match_every_module_with_that_last_name(llama):
    the_plan = plan(llama, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert paths(the_plan) == layer_paths(["q_proj", "v_proj"])
    row = next(r for r in the_plan.rows if r.path.endswith("0.self_attn.v_proj"))
    assert (row.kind, row.module_type, row.in_features, row.out_features) == (
        "linear",
        "Linear",
        64,
        32,
    )
    assert (row.r, row.alpha, row.scaling, row.params) == (8, 16, 2.0, 8 * (64 + 32))


def test_rows_follow_the_model_order(llama):
    the_plan = plan(llama, LoraConfig(target_modules=["v_proj", "q_proj", "embed_tokens"]))
    model_order = [name for name, _ in llama.named_modules()]
    row_paths = [row.path for row in the_plan.rows]
    assert row_paths == sorted(row_paths, key=model_order.index)
    assert row_paths[:3] == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_dotted_suffix_names_match_on_component_boundaries(llama):
    the_plan = plan(llama, LoraConfig(target_modules=["self_attn.q_proj", "layers.1.mlp.up_proj"]))
    assert paths(the_plan) == sorted(
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
        + ["model.layers.1.mlp.up_proj"]
    )
    # "proj" is not a suffix on a dot boundary of "q_proj"
    with pytest.raises(TargetError, match="'proj' matches no module"):
        plan(llama, LoraConfig(target_modules=["proj"]))


def test_a_string_is_a_regex_that_must_match_the_whole_path(llama):
    the_plan = plan(llama, LoraConfig(target_modules=r"model\.layers\.\d+\.self_attn\.(q|v)_proj"))
    assert paths(the_plan) == layer_paths(["q_proj", "v_proj"])
    the_plan = plan(llama, LoraConfig(target_modules=r".*\.1\..*_proj"))
    assert paths(the_plan) == layer_paths(LLAMA_LINEARS, layers=[1])
    with pytest.raises(TargetError) as info:
        plan(llama, LoraConfig(target_modules="q_proj"))  # a partial match is not enough
    message = str(info.value)
    assert "regex 'q_proj' matches no module" in message
    assert "write ['q_proj'] to match modules by name" in message  # the likely intent


def test_all_linear_skips_the_output_head_of_llama(llama):
    the_plan = plan(llama, LoraConfig(target_modules="all-linear"))
    assert paths(the_plan) == layer_paths(LLAMA_LINEARS)
    assert "lm_head" not in {row.path for row in the_plan.rows}


def test_all_linear_takes_gpt2_conv1d_and_skips_the_tied_head(gpt2):
    the_plan = plan(gpt2, LoraConfig(target_modules="all-linear"))
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert paths(the_plan) == sorted(f"transformer.h.{i}.{n}" for i in (0, 1) for n in names)
    assert {row.kind for row in the_plan.rows} == {"conv1d_gpt2"}
    assert {row.module_type for row in the_plan.rows} == {"Conv1D"}
    c_attn = next(r for r in the_plan.rows if r.path.endswith("c_attn"))
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)  # Conv1D stores (in, out)


def test_all_linear_on_a_plain_module_without_an_output_head():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    the_plan = plan(model, LoraConfig(r=2))
    assert paths(the_plan) == ["0", "2"]
    assert the_plan.adapter_params == 2 * (8 + 16) + 2 * (16 + 4)


@pytest.mark.parametrize(
    "exclude",
    [["layers.0.self_attn.q_proj", "v_proj"], r"model\.layers\.0\.self_attn\.q_proj|.*v_proj"],
    ids=["list", "regex"],
)
def test_exclude_modules(llama, exclude):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    assert paths(plan(llama, config)) == ["model.layers.1.self_attn.q_proj"]


def test_layers_filter(llama):
    the_plan = plan(llama, LoraConfig(target_modules=["q_proj", "down_proj"], layers=[0]))
    assert paths(the_plan) == layer_paths(["q_proj", "down_proj"], layers=[0])


def test_rank_and_alpha_patterns_first_matching_key_wins(llama):
    config = LoraConfig(
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={r"model\.layers\.0\.self_attn\.q_proj": 2, "q_proj": 4, r".*_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.1.self_attn.v_proj": 5},
    )
    ranks = {row.path: (row.r, row.alpha) for row in plan(llama, config).rows}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": (2, 16),
        "model.layers.1.self_attn.q_proj": (4, 16),
        "model.layers.0.self_attn.v_proj": (6, 3),
        "model.layers.1.self_attn.v_proj": (6, 3),  # "v_proj" came first
        "model.layers.0.self_attn.o_proj": (6, 16),
        "model.layers.1.self_attn.o_proj": (6, 16),
    }
    row = next(r for r in plan(llama, config).rows if r.path == "model.layers.0.self_attn.v_proj")
    assert row.scaling == 3 / 6
    assert row.params == 6 * (64 + 32)


def test_rslora_scaling_in_the_plan(llama):
    the_plan = plan(llama, LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert {row.scaling for row in the_plan.rows} == {8 / 4}


def test_modules_to_save_are_counted_and_not_targeted():
    bert = tiny_bert()
    the_plan = plan(bert, LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert the_plan.saved == (("classifier", 32 * 3 + 3),)
    assert "classifier" not in {row.path for row in the_plan.rows}
    assert the_plan.trainable == the_plan.adapter_params + 32 * 3 + 3
    with pytest.raises(TargetError, match="both targeted and in modules_to_save"):
        plan(
            bert, LoraConfig(target_modules=["query", "classifier"], modules_to_save=["classifier"])
        )


def test_fused_slices_count_only_the_adapted_slices(gpt2):
    config = LoraConfig(
        r=4, target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
    )
    rows = plan(gpt2, config).rows
    assert {row.slices for row in rows} == {(True, False, True)}
    assert {row.params for row in rows} == {2 * 4 * (64 + 64)}


def test_bias_modes_count_biases(gpt2):
    targets = ["c_attn"]
    assert plan(gpt2, LoraConfig(target_modules=targets)).bias_params == 0
    lora_only = plan(gpt2, LoraConfig(target_modules=targets, bias="lora_only"))
    assert lora_only.bias_params == 2 * 192
    every = plan(gpt2, LoraConfig(target_modules=targets, bias="all"))
    biases = sum(p.numel() for n, p in gpt2.named_parameters() if n.endswith("bias"))
    assert every.bias_params == biases


# -- errors ----------------------------------------------------------------------------------------
def test_a_target_matching_nothing_names_the_closest_modules(llama):
    with pytest.raises(TargetError) as info:
        plan(llama, LoraConfig(target_modules=["q_projj"]))
    message = str(info.value)
    assert "'q_projj' matches no module" in message
    assert "closest module names: q_proj" in message


@pytest.mark.parametrize(
    ("target", "module_type"),
    [("self_attn", "LlamaAttention"), ("input_layernorm", "LlamaRMSNorm")],
)
def test_a_target_of_an_unsupported_type_names_it_and_why(llama, target, module_type):
    with pytest.raises(TargetError) as info:
        plan(llama, LoraConfig(target_modules=[target]))
    message = str(info.value)
    assert f"model.layers.0.{target}" in message
    assert f"{module_type} is not a layer kind lorakit adapts" in message
    assert "nn.Linear" in message  # what is allowed


def test_multihead_attention_out_proj_is_refused_with_the_reason():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(TargetError, match="bypasses its forward"):
        plan(model, LoraConfig(target_modules=["out_proj"]))


def test_an_exclude_pattern_matching_nothing_is_an_error(llama):
    with pytest.raises(TargetError, match="exclude_modules entry 'v_prj' matches no module"):
        plan(llama, LoraConfig(target_modules=["q_proj"], exclude_modules=["v_prj"]))


def test_a_rank_pattern_key_matching_no_targeted_module_is_an_error(llama):
    # v_proj exists in the model but is not targeted
    with pytest.raises(TargetError, match="rank_pattern key 'v_proj' matches no targeted module"):
        plan(llama, LoraConfig(target_modules=["q_proj"], rank_pattern={"v_proj": 4}))
    with pytest.raises(TargetError, match="alpha_pattern key 'nothing'"):
        plan(llama, LoraConfig(target_modules=["q_proj"], alpha_pattern={"nothing": 4}))


def test_a_layer_index_beyond_the_model_is_an_error(llama):
    with pytest.raises(TargetError) as info:
        plan(llama, LoraConfig(target_modules=["q_proj"], layers=[99]))
    assert "layers [99]: no targeted module has that layer index" in str(info.value)
    assert "(targeted modules are in layers 0 to 1)" in str(info.value)


def test_a_missing_saved_module_is_an_error(llama):
    with pytest.raises(TargetError, match="modules_to_save entry 'classifier' matches no module"):
        plan(llama, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_problems_are_gathered_into_one_error(llama):
    config = LoraConfig(
        target_modules=["q_projj", "v_proj"], exclude_modules=["nothing"], layers=[0, 99]
    )
    with pytest.raises(TargetError) as info:
        plan(llama, config)
    message = str(info.value)
    assert "3 problems" in message
    assert "q_projj" in message and "nothing" in message and "[99]" in message


def test_plan_wants_a_lorakit_config(llama):
    with pytest.raises(TypeError, match="lorakit.LoraConfig"):
        plan(llama, {"r": 8})


# -- purity ----------------------------------------------------------------------------------------
def test_plan_never_mutates_the_model(llama):
    before_state = {k: v.clone() for k, v in llama.state_dict().items()}
    before_types = [(n, type(m)) for n, m in llama.named_modules()]
    before_grad = [p.requires_grad for p in llama.parameters()]
    config = LoraConfig(target_modules="all-linear", bias="all", rank_pattern={"q_proj": 2})
    plan(llama, config)
    with pytest.raises(TargetError):
        plan(llama, LoraConfig(target_modules=["self_attn"]))
    assert [(n, type(m)) for n, m in llama.named_modules()] == before_types
    assert [p.requires_grad for p in llama.parameters()] == before_grad
    after = llama.state_dict()
    assert after.keys() == before_state.keys()
    for key, value in before_state.items():
        assert torch.equal(after[key], value), key


def test_plan_equals_the_applied_adapter(llama):
    """The plan's count is what apply_lora then adds (on a copy of the base)."""
    import copy

    config = LoraConfig(r=4, target_modules="all-linear", rank_pattern={"q_proj": 2})
    the_plan = plan(llama, config)
    model = lorakit.apply_lora(copy.deepcopy(llama), config)
    assert sum(p.numel() for p in lorakit.adapter_parameters(model)) == the_plan.adapter_params
    trainable, total = lorakit.count_parameters(model)
    assert (trainable, total) == (the_plan.trainable, the_plan.total)
    # planning the adapted model again names the same modules
    assert paths(plan(model, config)) == paths(the_plan)


def test_plan_works_on_the_meta_device():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    the_plan = plan(model, LoraConfig(r=8, target_modules="all-linear"))
    assert paths(the_plan) == layer_paths(LLAMA_LINEARS)
    assert all(p.is_meta for p in model.parameters())


def test_str_is_a_table_with_a_totals_line(llama):
    the_plan = plan(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lines = str(the_plan).splitlines()
    assert lines[0].split() == ["module", "kind", "shape", "r", "alpha", "params"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 2 + 4 + 1
    assert "model.layers.0.self_attn.v_proj  linear  64->32" in str(the_plan)
    total = the_plan.adapter_params
    assert lines[-1].startswith(f"4 modules, {total:,} adapter parameters; trainable {total:,} /")
    assert lines[-1] == (
        f"4 modules, {total:,} adapter parameters; "
        + lorakit.parameter_line(the_plan.trainable, the_plan.total)
    )
    assert the_plan.to_dict()["adapter_params"] == total


# -- the LoRA paper's counts (Table 2), planned on meta-device models ------------------------------
@pytest.mark.parametrize(
    ("config", "targets", "r", "expected"),
    [
        (RobertaConfig(), ["query", "value"], 8, ROBERTA_BASE_R8),
        (
            RobertaConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
            ),
            ["query", "value"],
            8,
            ROBERTA_LARGE_R8,
        ),
        (
            DebertaV2Config(
                hidden_size=1536,
                num_hidden_layers=48,
                num_attention_heads=24,
                intermediate_size=6144,
            ),
            ["query_proj", "value_proj"],
            16,
            DEBERTA_XXL_R16,
        ),
    ],
    ids=["roberta-base", "roberta-large", "deberta-v2-xxlarge"],
)
def test_lora_paper_parameter_counts(config, targets, r, expected):
    model_class = DebertaV2Model if isinstance(config, DebertaV2Config) else RobertaModel
    with torch.device("meta"):
        model = model_class(config)
    the_plan = plan(model, LoraConfig(r=r, target_modules=targets))
    assert the_plan.adapter_params == expected
    assert len(the_plan.rows) == 2 * config.num_hidden_layers


def test_gpt3_175b_shaped_plan_is_fast_and_counts_q_and_v():
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=12288, n_layer=96, n_head=96, vocab_size=50257, n_positions=2048)
        )
    config = LoraConfig(
        r=4, target_modules=["c_attn"], fused_slices={"c_attn": (True, False, True)}
    )
    the_plan = plan(model, config)
    elapsed = time.perf_counter() - start
    assert the_plan.adapter_params == GPT3_R4_QV
    assert len(the_plan.rows) == 96
    assert the_plan.base_params > 174e9  # the base really is 175B-shaped
    assert elapsed < PLAN_SECONDS


# -- regular expressions from adapter files are bounded ------------------------------------------
HANG_TIMEOUT_S = 120  # generous: the refusal is immediate, a hang never ends


def test_an_adapter_file_with_a_backtracking_pattern_is_refused_not_matched(tmp_path):
    """A server loading an untrusted adapter: "(.+)+x" against "model.layers.0..." never ends.

    Run in a subprocess so that, were the pattern matched, the test fails on the timeout
    instead of hanging the suite.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = lorakit.apply_lora(
        LlamaForCausalLM(LlamaConfig(**LLAMA)), LoraConfig(target_modules=["q_proj"])
    )
    directory = lorakit.save_adapter(model, tmp_path / "adapter")
    config_file = directory / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "target_modules": "(.+)+x"}))
    src = str(Path(lorakit.__file__).resolve().parents[1])
    code = (
        "import sys, lorakit\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"model = LlamaForCausalLM(LlamaConfig(**{LLAMA!r}))\n"
        "try:\n"
        f"    lorakit.load_adapter(model, {str(directory)!r}, allow_base_mismatch=True)\n"
        "except lorakit.ConfigError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "'(.+)+x'" in result.stdout and "nested repetition" in result.stdout


@pytest.mark.parametrize(
    "pattern, expected",
    [
        (r".*\.(q_proj|v_proj)$", ("q_proj", "v_proj")),
        (
            r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
            ("q_proj", "k_proj", "v_proj", "o_proj"),
        ),
        (r"^(?!.*lm_head).*\.(gate|up)_proj", ("gate_proj", "up_proj")),
    ],
)
def test_ordinary_regex_targets_still_match(pattern, expected):
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    rows = plan(model, LoraConfig(target_modules=pattern)).rows
    assert sorted({row.path.rsplit(".", 1)[-1] for row in rows}) == sorted(expected)
    assert len(rows) == len(expected) * LLAMA["num_hidden_layers"]
