"""Training data: the three JSONL shapes, loss masks, bad lines named by file and line,
truncation, packing and the batch stream."""

import pytest

from conftest import char_tokenizer, write_jsonl
from lorakit.errors import DataError
from lorakit.generate import IGNORE, Formatter
from lorakit.train.data import (
    Batches,
    collate,
    encode_all,
    pack,
    parse_line,
    read_jsonl,
)

MAX_LENGTH = 128


def trained_text(tokenizer, row) -> str:
    """The text of the tokens that carry a label (the loss is computed on exactly these)."""
    return tokenizer.decode([i for i, label in zip(row.ids, row.labels) if label != IGNORE])


def encode(tokenizer, line: str, **kwargs):
    return Formatter(tokenizer, kwargs.pop("max_length", MAX_LENGTH), **kwargs).encode(
        parse_line(line, "data.jsonl:1")
    )


# -- the three shapes and their masks --------------------------------------------------------------


def test_prompt_completion_trains_on_the_completion_only(tokenizer):
    row = encode(tokenizer, '{"prompt": "2+2", "completion": "4"}')
    text = tokenizer.decode(row.ids)
    assert text == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert trained_text(tokenizer, row) == "4<|im_end|>\n"
    n_prompt = len(row.prompt_ids)
    assert row.labels[:n_prompt] == [IGNORE] * n_prompt
    assert row.labels[n_prompt:] == row.ids[n_prompt:]
    assert tokenizer.decode(row.prompt_ids).endswith("<|im_start|>assistant\n")
    assert (row.reference, row.question) == ("4", "2+2")


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    line = (
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},'
        ' {"role": "assistant", "content": "B1"}, {"role": "user", "content": "c"},'
        ' {"role": "assistant", "content": "D2"}], "id": 7}'
    )
    row = encode(tokenizer, line)
    assert trained_text(tokenizer, row) == "B1<|im_end|>\nD2<|im_end|>\n"
    assert "be brief" in tokenizer.decode(row.ids)
    assert row.reference == "D2" and row.question == "c"
    assert tokenizer.decode(row.prompt_ids).endswith("c<|im_end|>\n<|im_start|>assistant\n")


def test_text_rows_train_on_every_token(tokenizer):
    row = encode(tokenizer, '{"text": "hello"}')
    assert row.labels == row.ids
    assert tokenizer.decode(row.ids) == "hello<|im_end|>"
    assert row.reference is None


def test_without_a_chat_template_prompt_and_completion_are_joined_and_end_with_eos():
    tokenizer = char_tokenizer(chat_template=False)
    row = encode(tokenizer, '{"prompt": "Q: 1+1 A: ", "completion": "2"}')
    assert tokenizer.decode(row.ids, skip_special_tokens=True) == "Q: 1+1 A: 2"
    assert trained_text(tokenizer, row) == "2<|im_end|>"
    with pytest.raises(DataError, match="data.jsonl:1: 'messages' rows need a chat template"):
        encode(tokenizer, '{"messages": [{"role": "assistant", "content": "x"}]}')


def test_system_prompt_goes_first_unless_the_row_has_its_own(tokenizer):
    row = encode(tokenizer, '{"prompt": "p", "completion": "c"}', system_prompt="S!")
    assert tokenizer.decode(row.ids).startswith("<|im_start|>system\nS!<|im_end|>")
    assert tokenizer.decode(row.prompt_ids).startswith("<|im_start|>system\nS!")
    own = (
        '{"messages": [{"role": "system", "content": "mine"}, '
        '{"role": "assistant", "content": "x"}]}'
    )
    assert "S!" not in tokenizer.decode(encode(tokenizer, own, system_prompt="S!").ids)


def test_a_file_may_mix_shapes(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "p", "completion": "c"},
            {"text": "t"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    examples = read_jsonl(path)
    assert [e.kind for e in examples] == ["prompt", "text", "messages"]
    assert [e.where for e in examples] == [f"{path}:{i}" for i in (1, 2, 3)]


# -- bad input: file, line and problem ------------------------------------------------------------

BAD_LINES = [
    ('{"prompt": "a", "completion": "b"', "bad JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"prompt": "a"}', "missing field 'completion'"),
    ('{"completion": "b"}', "missing field 'prompt'"),
    ('{"prompt": 3, "completion": "b"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": ["b"]}', "field 'completion' must be a string, got list"),
    ('{"prompt": "a", "completion": "  "}', "field 'completion' is empty"),
    ('{"text": ""}', "field 'text' is empty"),
    ('{"input": "a", "output": "b"}', "expected the fields 'prompt' and 'completion'"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn to train on"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "role 'bot' is not one of"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\] must be an object with 'role'"),
    ('{"messages": [{"role": "assistant", "content": ""}]}', "empty assistant turn"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'content' must be a string, got int"),
    ("", "empty line"),
]


@pytest.mark.parametrize("line, problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_a_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": "ok"}, line])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{problem}") as info:
        read_jsonl(path)
    assert "d.jsonl:1" not in str(info.value)  # the good line is not blamed


def test_every_bad_line_is_listed_at_once(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{", '{"prompt": "a"}', '{"text": "ok"}', "{"])
    with pytest.raises(DataError, match="3 bad line") as info:
        read_jsonl(path)
    message = str(info.value)
    assert all(f"d.jsonl:{n}:" in message for n in (1, 2, 4))


def test_an_empty_file_or_a_missing_one_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file has no rows"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# -- truncation and packing ------------------------------------------------------------------------


def test_long_rows_are_truncated_and_counted(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "p", "completion": "c" * 40}, {"prompt": "p", "completion": "c"}],
    )
    rows, truncated = encode_all(read_jsonl(path), Formatter(tokenizer, max_length=30))
    assert truncated == 1
    assert [len(r.ids) for r in rows] == [30, 23]
    assert rows[0].truncated and not rows[1].truncated


def test_a_row_with_nothing_left_to_train_on_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p" * 50, "completion": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: nothing left to train on .*max_length=20"):
        encode_all(read_jsonl(path), Formatter(tokenizer, max_length=20))


def test_packing_keeps_rows_whole_and_their_masks(tokenizer):
    rows = [encode(tokenizer, f'{{"prompt": "p{i}", "completion": "c{i}"}}') for i in range(5)]
    packed = pack(rows, max_length=60)
    assert sum(len(p.ids) for p in packed) == sum(len(r.ids) for r in rows)
    assert all(len(p.ids) <= 60 for p in packed) and len(packed) < len(rows)
    assert [i for p in packed for i in p.labels] == [i for r in rows for i in r.labels]


# -- batches ---------------------------------------------------------------------------------------


def test_collate_pads_right_and_masks_padding(tokenizer):
    rows = [
        encode(tokenizer, '{"prompt": "a", "completion": "b"}'),
        encode(tokenizer, '{"text": "x"}'),
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    n0, n1 = len(rows[0].ids), len(rows[1].ids)
    assert batch["input_ids"].shape == (2, n0)
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert batch["labels"][1, n1:].tolist() == [IGNORE] * (n0 - n1)


def test_batches_cover_every_row_each_epoch_and_resume_from_a_position(tokenizer):
    rows = [encode(tokenizer, f'{{"prompt": "{i}", "completion": "x"}}') for i in range(10)]
    stream = Batches(rows, batch_size=4, seed=1)
    seen = [r.question for _ in range(5) for r in stream.next()]  # 20 rows: two epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == sorted(str(i) for i in range(10))
    assert seen[:10] != seen[10:]  # a fresh order each epoch

    again = Batches(rows, batch_size=4, seed=1)
    again.next(), again.next(), again.next()
    state = again.state_dict()
    resumed = Batches(rows, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert [r.question for _ in range(2) for r in resumed.next()] == seen[12:20]
    with pytest.raises(DataError, match="written for 10 training rows"):
        Batches(rows[:5], 4, 1).load_state_dict(state)


def test_invalid_utf8_in_a_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n{"bad\n'
    )
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert f"{path}: 2 bad line(s)" in str(e.value)
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at column 16)" in str(e.value)
    assert f"{path}:3: bad JSON" in str(e.value)
