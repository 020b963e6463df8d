"""``lorakit train``: the config and the data are checked before any model is loaded, and a good
config trains and prints the evaluation before and after."""

import pytest

import lorakit.models
from conftest import char_tokenizer, date_rows, tiny_llama, write_jsonl
from lorakit.cli.main import main


def lorakit_train(*argv) -> int:
    return main(["train", *argv])


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config and data were checked")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)


@pytest.fixture
def files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", date_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", date_rows(4, offset=3))
    (tmp_path / "run.yaml").write_text(
        "data: {train: train.jsonl, eval: eval.jsonl}\n"
        f"output: {{dir: {tmp_path / 'out'}, plot: false}}\n"
        "training: {steps: 2, batch_size: 4}\nlora: {r: 4}\nevaluation: {max_new_tokens: 3}\n"
    )
    return tmp_path


def test_a_bad_config_fails_fast_without_loading_a_model(files, capsys, no_model_loading):
    code = lorakit_train(str(files / "run.yaml"), "training.lr=fast", "lora.rank=2", "x.y=1")
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid training config (3 problems)" in err
    assert "training.lr='fast': expected a number" in err
    assert "unknown key lora.rank; valid keys: r, alpha" in err
    assert "unknown section 'x'" in err


def test_a_bad_data_line_fails_before_loading_a_model(files, capsys, no_model_loading):
    with (files / "train.jsonl").open("a") as f:
        f.write('{"prompt": "p", "completion": ""}\n')
    assert lorakit_train(str(files / "run.yaml")) == 2
    assert "train.jsonl:9: field 'completion' is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, line",
    [
        ("run.yaml", b"# caf\xe9\n"),
        ("train.jsonl", b'{"text": "caf\xe9"}\n'),
        ("eval.jsonl", b"\xff\n"),
    ],
)
def test_invalid_utf8_is_a_clean_error_naming_file_and_line(
    files, capsys, no_model_loading, name, line
):
    first, *rest = (files / name).read_bytes().splitlines(keepends=True)
    (files / name).write_bytes(first + line + b"".join(rest))
    code = lorakit_train(str(files / "run.yaml"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"{files / name}:2: not valid UTF-8" in err


def test_print_config_shows_the_resolved_config(files, capsys, no_model_loading):
    assert lorakit_train(str(files / "run.yaml"), "training.lr=1e-3", "--print-config") == 0
    out = capsys.readouterr().out
    assert "  lr: 0.001\n" in out and "  r: 4\n" in out
    assert str(files / "train.jsonl") in out


def test_overrides_alone_without_a_file(files, capsys, no_model_loading):
    train_file = files / "train.jsonl"
    assert lorakit_train(f"data.train={train_file}", "lora.r=2", "--print-config") == 0
    assert "  r: 2\n" in capsys.readouterr().out


def test_train_runs_and_prints_before_and_after(files, capsys, monkeypatch):
    tokenizer = char_tokenizer()
    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (tiny_llama(len(tokenizer)), tokenizer)
    )
    assert lorakit_train(str(files / "run.yaml")) == 0
    out = capsys.readouterr().out
    assert "before training: loss" in out and "after training:  loss" in out
    assert "exact match 0/4" in out
    assert (files / "out" / "adapter" / "adapter_config.json").is_file()
    assert (files / "out" / "report.md").is_file()


def test_the_example_that_init_writes_trains_as_it_is(tmp_path, capsys, monkeypatch):
    """``lorakit init --example date_demo`` then ``lorakit train date_demo.yaml``, without a clone
    (the tiny model stands in for the embedded one; a few steps on a few rows)."""
    tokenizer = char_tokenizer()
    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (tiny_llama(len(tokenizer)), tokenizer)
    )
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--example", "date_demo"]) == 0
    short = ["training.steps=2", "training.warmup_steps=0", "training.checkpoint_every=0"]
    short += ["evaluation.max_rows=2", "evaluation.max_new_tokens=2", "output.plot=false"]
    assert lorakit_train("date_demo.yaml", *short) == 0
    assert "after training:  loss" in capsys.readouterr().out
    assert (tmp_path / "runs" / "date_demo" / "adapter" / "adapter_config.json").is_file()
