"""``lorakit generate`` and ``lorakit eval`` with adapters trained by ``lorakit train``, on a tiny
Llama (the model loader is replaced by one that builds it)."""

import pytest

import lorakit.models
from conftest import char_tokenizer, date_rows, run_config, tiny_llama
from lorakit.cli.generate import adapter_names
from lorakit.cli.main import main
from lorakit.io import load_adapter
from lorakit.train import train
from lorakit.train.data import Formatter
from lorakit.train.evaluate import generate


@pytest.fixture
def adapters(tmp_path, monkeypatch):
    """Two adapters trained differently on the same tiny base, and a loader that builds it."""
    tokenizer = char_tokenizer()
    monkeypatch.setattr(
        lorakit.models, "load_model", lambda *a, **k: (tiny_llama(len(tokenizer)), tokenizer)
    )
    dirs = []
    for name, lr in (("one", 1e-2), ("two", 5e-2)):
        cfg = run_config(tmp_path / name, training={"steps": 6, "lr": lr})
        dirs.append(str(train(cfg, model=tiny_llama(len(tokenizer)), tokenizer=tokenizer).saved))
    return tmp_path, dirs


def test_adapter_names_are_short_and_unique():
    assert adapter_names(["runs/a/adapter", "x/a/adapter", "my adapter", "base"]) == [
        "a", "a-2", "my_adapter", "base-2"
    ]  # fmt: skip


def test_generate_answers_with_every_adapter_as_each_alone(adapters, capsys):
    tmp_path, dirs = adapters
    assert main(["generate", "--base", "--adapter", dirs[0], "--adapter", dirs[1],
                 "--max-new-tokens", "3", "d1", "d7"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "> d1" and lines[4] == "> d7"
    assert [line.split()[0] for line in lines[1:4]] == ["[base]", "[run]", "[run-2]"]

    # the mixed batches give what each adapter gives alone
    tokenizer = char_tokenizer()
    prompt = Formatter(tokenizer, 64).prompt_ids("d7")
    for directory, line in zip([None, *dirs], lines[5:8]):
        model = tiny_llama(len(tokenizer))
        if directory is not None:
            model = load_adapter(model, directory)
        alone = generate(model, tokenizer, [prompt], max_new_tokens=3)[0]
        assert line.split(maxsplit=1)[1:] == ([alone] if alone else [])


def test_eval_scores_the_base_and_each_adapter(adapters, capsys):
    tmp_path, dirs = adapters
    data = tmp_path / "one" / "eval.jsonl"
    assert main(["eval", str(data), "--base", "--adapter", dirs[0], "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"6 rows from {data}")
    assert "[base] loss " in out and "[run] loss " in out and "exact match" in out
    assert out.count("(expected '") == 2


def test_eval_with_a_config_uses_its_eval_file(adapters, capsys, tmp_path):
    config = tmp_path / "c.yaml"
    (tmp_path / "t.jsonl").write_text(
        "".join(f'{{"text": "{r["prompt"]}"}}\n' for r in date_rows(3))
    )
    config.write_text("data: {train: t.jsonl}\n")
    assert main(["eval", str(config)]) == 1
    assert "data.eval is not set" in capsys.readouterr().err
    assert main(["eval", str(config), f"data.eval={tmp_path / 't.jsonl'}"]) == 0
    out = capsys.readouterr().out
    assert "[base] loss " in out and "exact match" not in out  # text rows have no answer
