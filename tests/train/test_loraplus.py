"""LoRA+ (``training.loraplus_lr_ratio``): the optimizer groups of a tiny Llama found by what the
parameters are, the same rates per parameter as PEFT's ``create_loraplus_optimizer``, one AdamW
step equal to the float64 formula with B's rate, the schedule scaling every group, a run that
writes its adapter and resumes with the same losses, and bad values refused."""

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit.models
from conftest import Crash, CrashAt, Quiet, char_tokenizer, resumed, run, run_config, tiny_llama
from lorakit import LoraConfig
from lorakit.cli.main import main
from lorakit.errors import ConfigError
from lorakit.model import apply_lora, lora_layers
from lorakit.train import checkpoint, schedule
from lorakit.train.checkpoint import CheckpointError
from lorakit.train.config import TrainingSection
from lorakit.train.output import TrainingError
from lorakit.train.param_groups import GROUPS, describe, param_groups
from lorakit.train.setup import build_optimizer

VOCAB = 48
LR, RATIO, LR_EMBEDDING, DECAY = 1e-2, 16.0, 1e-3, 0.1
TARGETS = ("q_proj", "v_proj", "down_proj", "embed_tokens")
LORA = LoraConfig(r=4, alpha=8, target_modules=TARGETS)
LORAPLUS = {"loraplus_lr_ratio": RATIO}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def adapted(lora: LoraConfig = LORA, name: str = "default", model: nn.Module | None = None):
    return apply_lora(model if model is not None else tiny_llama(VOCAB), lora, name)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def groups_of(model: nn.Module) -> list[dict]:
    return param_groups(
        model,
        trainable(model),
        lr=LR,
        ratio=RATIO,
        lr_embedding=LR_EMBEDDING,
        weight_decay=DECAY,
    )


def named(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


# -- the groups ---------------------------------------------------------------------------------


def test_groups_of_a_tiny_llama_by_what_the_parameters_are():
    model = adapted()
    groups = groups_of(model)
    assert [g["name"] for g in groups] == list(GROUPS)
    assert [g["lr"] for g in groups] == [LR, LR * RATIO, LR_EMBEDDING, LR]
    assert {g["weight_decay"] for g in groups} == {DECAY}
    found = named(model, groups)
    a, b, embedding = set(), set(), set()
    for path, layer in lora_layers(model):
        kind = embedding if layer.kind == "embedding" else None
        (kind if kind is not None else a).add(f"{path}.lora_A.default")
        (kind if kind is not None else b).add(f"{path}.lora_B.default")
    assert found == {"A": a, "B": b, "embedding": embedding, "base": set()}
    assert len(a) == 2 * 3 and embedding == {
        "model.embed_tokens.lora_A.default",
        "model.embed_tokens.lora_B.default",
    }
    # every trainable parameter is in exactly one group
    assert sum(len(g["params"]) for g in groups) == len(trainable(model))


def test_saved_modules_and_biases_train_at_the_base_rate():
    lora = dataclasses.replace(LORA, modules_to_save=("lm_head",), bias="all")
    model = tiny_llama(VOCAB)
    model.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.zeros(32))
    model = adapted(lora, model=model)
    found = named(model, groups_of(model))
    assert found["base"] == {
        "model.layers.0.self_attn.q_proj.bias",
        "lm_head.modules_to_save.default.weight",
    }
    assert not any("bias" in n or "lm_head" in n for g in ("A", "B") for n in found[g])


def test_dora_magnitudes_go_with_b():
    model = adapted(dataclasses.replace(LORA, target_modules=TARGETS[:3], use_dora=True))
    found = named(model, groups_of(model))
    magnitudes = {n for n, _ in model.named_parameters() if ".lora_magnitude." in n}
    assert len(magnitudes) == 6 and magnitudes <= found["B"]
    assert len(found["A"]) == 6 and len(found["B"]) == 12


def test_a_magnitude_vector_goes_with_b_found_by_identity():
    """DoRA's 1-D magnitude (``lora_magnitude``, a third tensor per adapter) trains at B's rate,
    as PEFT's 1-D adapter tensors do; found from the layer, whatever its name."""
    model = adapted()
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_magnitude = nn.ParameterDict({"default": nn.Parameter(torch.ones(32))})
    groups = groups_of(model)
    (b,) = [g for g in groups if g["name"] == "B"]
    assert any(p is layer.lora_magnitude["default"] for p in b["params"])


def test_many_adapters_share_the_groups_each_by_its_role():
    model = adapted(name="one")
    model = adapted(dataclasses.replace(LORA, r=2), name="two", model=model)
    found = named(model, groups_of(model))
    for name in ("one", "two"):
        assert f"model.layers.1.self_attn.q_proj.lora_A.{name}" in found["A"]
        assert f"model.layers.1.self_attn.q_proj.lora_B.{name}" in found["B"]
        assert f"model.embed_tokens.lora_B.{name}" in found["embedding"]


def test_without_a_ratio_the_optimizer_keeps_one_group():
    model = adapted()
    optimizer = build_optimizer(trainable(model), TrainingSection(lr=LR), model)
    assert len(optimizer.param_groups) == 1 and "name" not in optimizer.param_groups[0]


def test_describe_names_each_group_with_tensors_and_its_peak_rate():
    model = adapted()
    tc = TrainingSection(lr=LR, loraplus_lr_ratio=RATIO, warmup_steps=4)
    lines = []
    optimizer = build_optimizer(trainable(model), tc, model, lines.append)
    schedule.build(optimizer, 10, 4, "cosine")  # the first step's rate is a quarter of lr
    assert lines == [describe(optimizer.param_groups)]
    assert lines[0] == (
        "LoRA+ optimizer groups: A 6 tensors at lr 0.01, B 6 tensors at lr 0.16, "
        "embedding 2 tensors at lr 1e-06"
    )


# -- parity with PEFT ---------------------------------------------------------------------------


def peft_key(name: str) -> tuple[str, str]:
    """(module path, role) of a PEFT parameter name:
    ``base_model.model.model.embed_tokens.lora_embedding_A.default`` -> (model.embed_tokens, A);
    DoRA's magnitude (``lora_magnitude_vector``) is role ``m``, as lorakit's ``lora_magnitude``."""
    name = name.removeprefix("base_model.model.")
    for marker, role in ((".lora_embedding_A.", "A"), (".lora_embedding_B.", "B"),
                         (".lora_A.", "A"), (".lora_B.", "B"),
                         (".lora_magnitude_vector.", "m")):  # fmt: skip
        if marker in name:
            return name.split(marker)[0], role
    raise AssertionError(f"not an adapter parameter: {name}")


@pytest.mark.parametrize(
    "targets, dora, count",
    [(TARGETS, False, 14), (TARGETS[:3], True, 18)],  # DoRA: linear layers only, 6 magnitudes
    ids=["lora with an embedding", "dora"],
)
def test_same_rate_and_decay_per_parameter_as_peft(targets, dora, count):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    ours = adapted(dataclasses.replace(LORA, target_modules=targets, use_dora=dora))
    theirs = peft.get_peft_model(
        tiny_llama(VOCAB),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0, use_dora=dora
        ),
    )
    reference = create_loraplus_optimizer(
        theirs,
        torch.optim.AdamW,
        lr=LR,
        loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=LR_EMBEDDING,
        loraplus_weight_decay=DECAY,
    )
    names = {id(p): n for n, p in theirs.named_parameters()}
    expected = {
        peft_key(names[id(p)]): (g["lr"], g["weight_decay"])
        for g in reference.param_groups
        for p in g["params"]
    }
    mine = {id(p): n for n, p in ours.named_parameters()}
    got = {}
    for g in groups_of(ours):
        for p in g["params"]:
            path, _, rest = mine[id(p)].partition(".lora_")
            got[(path, rest[0])] = (g["lr"], g["weight_decay"])
    assert got == expected and len(got) == count  # 6 layers' A and B, and the rest
    assert len({lr for lr, _ in got.values()}) == 3 - dora  # A's, B's (, the embedding's)


# -- one step -----------------------------------------------------------------------------------


def test_one_adamw_step_equals_the_float64_formula_with_each_groups_rate():
    """After a warm-up schedule's first factor (1/2) every group steps at half its own rate:
    ``p ← p (1 - lr·wd) - lr · g / (|g| + eps)`` (AdamW's first step: m̂ = g, v̂ = g²)."""
    model = adapted()
    with torch.no_grad():  # B (and the embedding's A) off zero, so every tensor gets a gradient
        for p in trainable(model):
            p.normal_(0, 0.1)
    tc = TrainingSection(
        lr=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=LR_EMBEDDING, weight_decay=DECAY
    )
    optimizer = build_optimizer(trainable(model), tc, model)
    schedule.build(optimizer, 10, 2, "constant")
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    expected = []
    for g in optimizer.param_groups:
        lr = {"A": LR, "B": LR * RATIO, "embedding": LR_EMBEDDING, "base": LR}[g["name"]] / 2
        assert g["lr"] == pytest.approx(lr)
        for p in g["params"]:
            w, grad = p.detach().double(), p.grad.double()
            expected.append(w * (1 - lr * DECAY) - lr * grad / (grad.abs() + 1e-8))
    optimizer.step()
    got = [p.detach().double() for g in optimizer.param_groups for p in g["params"]]
    # float32 parameters against the float64 formula: float32's tolerances
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)
    b = next(g for g in optimizer.param_groups if g["name"] == "B")
    assert any(p.grad.abs().max() > 0 for p in b["params"])


# -- a run: the command line, the adapter, resuming ---------------------------------------------

# threads=1 in both processes: a different thread count sums in another order (last-bit changes)
RESUME = {"training": {"steps": 6, "checkpoint_every": 2, "threads": 1, **LORAPLUS}}
RUN_LORA = {"r": 4, "alpha": 8, "target_modules": list(TARGETS)}


def test_lorakit_train_with_loraplus_says_its_groups_and_writes_the_adapter(
    tmp_path, capsys, monkeypatch
):
    tokenizer = char_tokenizer()
    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (tiny_llama(len(tokenizer)), tokenizer)
    )
    cfg = run_config(
        tmp_path, lora=RUN_LORA, training={"steps": 2, **LORAPLUS}, output={"report": True}
    )
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "LoRA+ optimizer groups: A 6 tensors at lr 0.01, B 6 tensors at lr 0.16, " in out
    assert "embedding 2 tensors at lr 1e-06" in out
    run_dir = Path(cfg.output.dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "- LoRA+: B at 16 x lr (0.16)" in (run_dir / "report.md").read_text()


def test_a_loraplus_run_resumes_with_the_losses_of_the_uninterrupted_run(tmp_path):
    whole = run(run_config(tmp_path / "a", lora=RUN_LORA, **RESUME))
    plain = run(run_config(tmp_path / "p", lora=RUN_LORA, training=RESUME["training"] | {
        "loraplus_lr_ratio": None}))  # fmt: skip
    assert whole.losses[6] != plain.losses[6]  # B's rate changed the run

    cfg = run_config(tmp_path / "b", lora=RUN_LORA, **RESUME)
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(5)])
    again = run(resumed(cfg))
    assert again.start_step == 4
    assert again.losses == {s: whole.losses[s] for s in (5, 6)}  # exactly, not close


def test_a_checkpoint_of_another_group_layout_is_refused_clearly(tmp_path):
    plain = {"training": {"steps": 4, "checkpoint_every": 2}}
    cfg = run_config(tmp_path, lora=RUN_LORA, **plain)
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(3)])
    changed = run_config(tmp_path, lora=RUN_LORA, training={**plain["training"], **LORAPLUS,
                                                            "resume": True})  # fmt: skip
    with pytest.raises(TrainingError, match=r"training.loraplus_lr_ratio: None -> 16.0"):
        run(changed, console=Quiet())

    # the groups themselves are checked too (a checkpoint whose config says nothing of them)
    saved = checkpoint.load(checkpoint.checkpoints(Path(cfg.output.dir))[-1])
    model = apply_lora(tiny_llama(len(char_tokenizer())), cfg.lora)
    tc = TrainingSection(lr=LR, **LORAPLUS)
    optimizer = build_optimizer(trainable(model), tc, model)
    expected = (
        r"groups \(one group of 14\) do not fit this run's \(A 6, B 6, embedding 2, base 0\); "
        "training.loraplus_lr_ratio decides the groups"
    )
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.check_fits(saved, model, optimizer)


# -- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "training, message",
    [
        ({"loraplus_lr_ratio": 0}, "training.loraplus_lr_ratio=0.0: must be greater than 0"),
        ({"loraplus_lr_ratio": -16}, "training.loraplus_lr_ratio=-16.0: must be greater than 0"),
        ({"loraplus_lr_ratio": True}, "training.loraplus_lr_ratio=True: expected a number or null"),
        ({"loraplus_lr_ratio": "x"}, "training.loraplus_lr_ratio='x': expected a number or null"),
        (
            {"loraplus_lr_ratio": 16, "loraplus_lr_embedding": 0},
            "training.loraplus_lr_embedding=0.0: must be greater than 0",
        ),
        (
            {"loraplus_lr_embedding": 1e-5},
            "training.loraplus_lr_embedding=1e-05: applies only with LoRA+; set "
            "training.loraplus_lr_ratio",
        ),
        (
            {"loraplus_lr_ratio": 16, "method": "full"},
            "training.loraplus_lr_ratio=16.0: LoRA+ sets the rate of LoRA's B matrices; "
            "training.method=full has none",
        ),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_what_is_expected(tmp_path, training, message):
    with pytest.raises(ConfigError) as e:
        run_config(tmp_path, training=training)
    assert message in str(e.value)


# -- after FSDP2 --------------------------------------------------------------------------------


def test_groups_find_the_sharded_parameters_after_fsdp_wraps_them(tmp_path):
    """FSDP2 replaces each parameter by a sharded DTensor one; the optimizer is built after, and
    the groups find those (one gloo process: the same replacement as on many)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = adapted()
        before = trainable(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        params = trainable(model)
        assert all(isinstance(p, DTensor) for p in params)
        assert not any(p is q for p, q in zip(params, before))  # replaced
        groups = groups_of(model)
        assert [len(g["params"]) for g in groups] == [6, 6, 2, 0]
        tc = TrainingSection(lr=LR, **LORAPLUS)
        optimizer = build_optimizer(params, tc, model)
        ids = torch.randint(0, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    finally:
        dist.destroy_process_group()


# -- many adapters in one run -------------------------------------------------------------------


def test_each_adapter_of_a_loraplus_many_adapter_run_equals_its_own_run_alone(tmp_path):
    """The tolerance is the many-adapter tests' (test_multi_adapter.py): the shared batch is
    padded to the widest row of all the adapters, so sums run in another order than alone."""
    from conftest import date_rows, write_jsonl
    from lorakit.train.config import build

    raw = run_config(tmp_path, lora=RUN_LORA, training={"steps": 3, "threads": 1, **LORAPLUS})
    raw = raw.to_dict()
    del raw["data"]["train"], raw["data"]["eval"]
    raw["adapters"] = {
        "one": {"data": {"train": write_jsonl(tmp_path / "one.jsonl", date_rows(8))}},
        "two": {
            "data": {"train": write_jsonl(tmp_path / "two.jsonl", date_rows(12, offset=5))},
            "lora": {"r": 2},
        },
    }
    cfg, lines = build(raw), Quiet()
    many = run(cfg, console=lines)
    assert sum(line.startswith("LoRA+ optimizer groups: A 12 tensors") for line in lines.lines) == 1
    for section in cfg.adapters:
        out = dataclasses.replace(cfg.output, dir=str(tmp_path / "alone" / section.name))
        alone = run(dataclasses.replace(cfg.alone(section), output=out))
        assert sorted(alone.losses) == [1, 2, 3]
        for step, loss in alone.losses.items():
            assert many.adapters[section.name].losses[step] == pytest.approx(loss, rel=1e-4)
