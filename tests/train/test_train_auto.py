"""``training.lr: auto`` and ``training.epochs: auto``: the rules the README states, and a run that
uses them."""

import pytest

from conftest import Quiet, char_tokenizer, date_rows, run_config, tiny_llama, write_jsonl
from lorakit import ConfigError
from lorakit.train import train
from lorakit.train.config import auto_epochs, auto_lr, build, load_config, resolve_auto
from lorakit.train.metrics import read_metrics


def test_the_defaults_are_auto(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", date_rows(4))
    data = f"data.train={tmp_path / 'train.jsonl'}"
    training = load_config(None, [data]).training
    assert (training.lr, training.epochs) == ("auto", "auto")
    assert load_config(None, [data, "training.lr=3e-4"]).training.lr == 3e-4


def test_auto_lr_is_the_methods_rate_at_135m_scaled_down_for_larger_bases():
    assert auto_lr("lora", 135_000_000) == 2e-3
    assert auto_lr("qlora", 135_000_000) == 2e-3
    assert auto_lr("full", 135_000_000) == 5e-5
    assert auto_lr("lora", 1_000_000) == 2e-3  # never more for a smaller base
    assert auto_lr("lora", 7_000_000_000) == pytest.approx(2.78e-4, rel=1e-2)
    assert auto_lr("lora", 4 * 135_000_000) == pytest.approx(1e-3)  # sqrt(1/4)


def test_auto_epochs_make_at_least_100_steps_and_at_most_3_passes():
    assert auto_epochs(1000, 8) == 1.0  # 125 steps in one pass
    assert auto_epochs(800, 8) == 1.0  # exactly 100
    assert auto_epochs(400, 8) == 2.0  # 50 steps a pass: two
    assert auto_epochs(300, 8) == pytest.approx(800 / 300)  # 100 steps: 2.67 passes
    assert auto_epochs(100, 8) == 3.0  # 12.5 steps a pass: capped at 3 passes
    assert auto_epochs(400, 16) == 3.0  # batch_size * grad_accum rows a step


def test_resolve_auto_fills_only_auto_values(tmp_path):
    cfg = run_config(tmp_path, training={"lr": "auto", "epochs": "auto", "batch_size": 4})
    resolved = resolve_auto(cfg, params=540_000_000, rows=200)
    assert resolved.training.lr == pytest.approx(1e-3)
    assert resolved.training.epochs == 2.0
    assert resolved.training.batch_size == 4 and resolved.lora == cfg.lora
    explicit = run_config(tmp_path, training={"lr": 1e-2, "epochs": 1.5})
    assert resolve_auto(explicit, params=540_000_000, rows=200) is explicit


@pytest.mark.parametrize(
    "lora, training, factor",
    [
        ({"init": "pissa"}, {}, 0.1),
        ({"init": "pissa_niter_4"}, {}, 0.1),
        ({"init": "olora"}, {}, 0.1),
        ({"init": "loftq"}, {"method": "qlora"}, 1.0),  # LoftQ trained well at LoRA's rate
        ({"use_dora": True}, {}, 1.0),
        ({}, {"loraplus_lr_ratio": 16}, 1 / 16),  # B's rate is then LoRA's
        ({"init": "olora"}, {"loraplus_lr_ratio": 4}, 0.1 / 4),
    ],
)
def test_auto_lr_follows_the_variant(tmp_path, lora, training, factor):
    """The variants whose first steps diverged at LoRA's rate (BENCHMARKS.md, section variants)
    get a lower auto rate; an explicit lr is theirs to choose."""
    cfg = run_config(tmp_path, lora=lora, training={"lr": "auto", **training})
    resolved = resolve_auto(cfg, params=135_000_000, rows=200)
    assert resolved.training.lr == pytest.approx(2e-3 * factor)
    explicit = run_config(tmp_path, lora=lora, training={"lr": 3e-3, **training})
    assert resolve_auto(explicit, params=135_000_000, rows=200).training.lr == 3e-3


def test_auto_lr_of_many_adapters_takes_the_lowest_of_theirs(tmp_path):
    cfg = run_config(tmp_path, training={"lr": "auto"})
    raw = cfg.to_dict()
    train_file = raw["data"].pop("train")
    raw["data"]["eval"] = None
    raw["adapters"] = {
        "plain": {"data": {"train": train_file}},
        "svd": {"data": {"train": train_file}, "lora": {"init": "pissa"}},
    }
    resolved = resolve_auto(build(raw), params=135_000_000, rows=200)
    assert resolved.training.lr == pytest.approx(2e-4)


def test_the_run_says_why_its_auto_lr_is_lower(tmp_path):
    cfg = run_config(tmp_path, lora={"init": "olora"}, training={"lr": "auto", "steps": 1})
    console = Quiet()
    tokenizer = char_tokenizer()
    train(cfg, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, console=console)
    assert "training.lr: auto = 0.0002 (lora.init olora: a tenth of LoRA's)" in console.lines


def test_a_run_with_auto_values_uses_and_reports_them(tmp_path):
    # 24 rows of 4 a step: one pass is 6 steps, so 3 passes (18 steps); a tiny base: lr 2e-3.
    cfg = run_config(tmp_path, training={"steps": None, "lr": "auto", "epochs": "auto"})
    console = Quiet()
    tokenizer = char_tokenizer()
    result = train(cfg, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer, console=console)
    assert result.steps == 18
    assert "training.lr: auto = 0.002" in console.lines
    assert "training.epochs: auto = 3" in console.lines
    lrs = [
        r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert max(lrs) == pytest.approx(2e-3, rel=0.05)


def test_auto_is_the_only_word_a_number_key_takes(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", date_rows(4))
    with pytest.raises(ConfigError, match="training.lr='fast': expected a number or 'auto'"):
        build({"data": {"train": str(tmp_path / "train.jsonl")}, "training": {"lr": "fast"}})
