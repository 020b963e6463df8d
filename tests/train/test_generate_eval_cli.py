"""``lorakit generate`` and ``lorakit eval`` with adapters trained by ``lorakit train``, on a tiny
Llama (the model loader is replaced by one that builds it)."""

import io

import pytest

import lorakit
import lorakit.models
from conftest import char_tokenizer, date_rows, run_config, tiny_llama
from lorakit.cli.generate import adapter_names
from lorakit.cli.main import main
from lorakit.generate import Example, Formatter, generate
from lorakit.io import load_adapter
from lorakit.train import train


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
    assert main(["eval", str(config)]) == 2
    assert "data.eval is not set" in capsys.readouterr().err
    assert main(["eval", str(config), f"data.eval={tmp_path / 't.jsonl'}"]) == 0
    out = capsys.readouterr().out
    assert "[base] loss " in out and "exact match" not in out  # text rows have no answer


def _chat_reference(model, tokenizer, history):
    """What chat should answer: greedy generation from the conversation in the template."""
    turns = (*history, {"role": "assistant", "content": ""})
    prompt, _ = Formatter(tokenizer, 10**9).generation_prompt(Example("t", turns, kind="messages"))
    return generate(model, tokenizer, [prompt], max_new_tokens=4)[0]


def test_chat_answers_turn_by_turn_with_the_whole_conversation(adapters, capsys, monkeypatch):
    tmp_path, dirs = adapters
    monkeypatch.setattr("sys.stdin", io.StringIO("d1\nd7\n/reset\nd1\n\nnot read\n"))
    assert main(["chat", "--adapter", dirs[0], "--max-new-tokens", "4"]) == 0
    answers = capsys.readouterr().out.split("\n")[:3]

    tokenizer = char_tokenizer()
    model = load_adapter(tiny_llama(len(tokenizer)), dirs[0]).eval()
    first = _chat_reference(model, tokenizer, [{"role": "user", "content": "d1"}])
    history = [
        {"role": "user", "content": "d1"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "d7"},
    ]
    assert answers == [first, _chat_reference(model, tokenizer, history), first]  # after /reset


def test_chat_with_several_adapters_applies_them_together(adapters, capsys, monkeypatch):
    tmp_path, dirs = adapters
    monkeypatch.setattr("sys.stdin", io.StringIO("d3\n"))
    assert main(["chat", "--adapter", dirs[0], "--adapter", dirs[1], "--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out.split("\n")[0]

    tokenizer = char_tokenizer()
    model = lorakit.merge_and_unload(load_adapter(tiny_llama(len(tokenizer)), dirs[0]))
    # the first folded in (so the base differs from the one the second was saved for)
    model = load_adapter(model, dirs[1], allow_base_mismatch=True).eval()
    assert answer == _chat_reference(model, tokenizer, [{"role": "user", "content": "d3"}])


def test_chat_without_a_template_sends_the_turns_as_plain_lines(adapters, capsys, monkeypatch):
    tmp_path, dirs = adapters
    monkeypatch.setattr("sys.stdin", io.StringIO("d1\nd2\n"))
    assert main(["chat", "--no-chat-template", "--adapter", dirs[0], "--max-new-tokens", "3"]) == 0
    answers = capsys.readouterr().out.split("\n")[:2]

    tokenizer = char_tokenizer()
    model = load_adapter(tiny_llama(len(tokenizer)), dirs[0]).eval()
    plain = Formatter(tokenizer, 10**9, chat_template=False)
    first = generate(model, tokenizer, [plain.prompt_ids("d1\n")], max_new_tokens=3)[0]
    second = generate(model, tokenizer, [plain.prompt_ids(f"d1\n{first}\nd2\n")], max_new_tokens=3)[
        0
    ]
    assert answers == [first, second]


@pytest.mark.parametrize("given", ["jsonl", "config"])
def test_eval_names_invalid_utf8_by_file_and_line(tmp_path, capsys, monkeypatch, given):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)
    data = tmp_path / "held_out.jsonl"
    data.write_bytes(
        b'{"prompt": "d1", "completion": "1x"}\n{"prompt": "d\xff", "completion": "x"}\n'
    )
    (tmp_path / "c.yaml").write_text("data: {train: held_out.jsonl, eval: held_out.jsonl}\n")
    argv = [str(data)] if given == "jsonl" else [str(tmp_path / "c.yaml")]
    code = main(["eval", *argv])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"{data}:2: not valid UTF-8 (byte 0xff at column 14)" in err
