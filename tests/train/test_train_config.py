"""The training config: sections, overrides, types, paths, and every problem reported at once."""

import pytest

from conftest import date_rows, write_jsonl
from lorakit import ConfigError, LoraConfig
from lorakit.train.config import TrainConfig, build, load_config, valid_keys
from lorakit.train.schedule import factor


@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", date_rows(4))
    return tmp_path


def write_yaml(path, text):
    path.write_text(text)
    return path


def test_a_yaml_file_with_overrides(data):
    path = write_yaml(
        data / "run.yaml",
        "data: {train: train.jsonl}\nlora: {r: 4, target_modules: [q_proj, v_proj]}\n"
        "training: {lr: 2e-3, steps: 5}\n",
    )
    cfg = load_config(path, ["training.steps=7", "lora.alpha=8", "model.dtype=bfloat16"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.training.lr == 2e-3  # YAML 1.1 reads "2e-3" as a string; the config reads a number
    assert cfg.training.steps == 7
    assert cfg.lora == LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    assert cfg.model.dtype == "bfloat16"
    assert cfg.data.train == str(data / "train.jsonl")  # relative to the YAML file
    assert load_config(None, [f"data.train={data / 'train.jsonl'}"]).training.lr == "auto"


def test_data_paths_in_the_file_are_relative_to_the_file_on_the_command_line_to_the_cwd(
    data, monkeypatch
):
    sub = data / "configs"
    sub.mkdir()
    path = write_yaml(sub / "run.yaml", "data: {train: ../train.jsonl}\n")
    assert load_config(path).data.train == str(sub / "../train.jsonl")
    monkeypatch.chdir(data)
    assert load_config(path, ["data.train=train.jsonl"]).data.train == "train.jsonl"


def test_unknown_keys_and_sections_list_the_valid_ones(data):
    with pytest.raises(ConfigError) as info:
        build({"data": {"train": str(data / "train.jsonl")}, "trainig": {}, "training": {"lr0": 1}})
    message = str(info.value)
    assert "unknown section 'trainig'; valid sections: model, data, lora, training" in message
    assert "unknown key training.lr0; valid keys: method, steps, epochs" in message
    with pytest.raises(ConfigError, match="unknown key lora.rank; valid keys: r, alpha"):
        build({"data": {"train": str(data / "train.jsonl")}, "lora": {"rank": 4}})


def test_every_problem_is_reported_at_once_with_its_dotted_key(data):
    with pytest.raises(ConfigError) as info:
        build(
            {
                "data": {"train": str(data / "missing.jsonl"), "max_length": 0},
                "training": {"lr": "fast", "batch_size": 2.5, "schedule": "cos", "resume": "yes"},
                "evaluation": {"max_new_tokens": -1},
                "lora": {"r": 0},
            }
        )
    message = str(info.value)
    for expected in [
        "data.max_length=0: must be greater than 0",
        "training.lr='fast': expected a number",
        "training.batch_size=2.5: expected an integer",
        "training.schedule='cos': expected one of 'cosine', 'linear', 'constant'",
        "training.resume='yes': expected true or false",
        "evaluation.max_new_tokens=-1: must be greater than 0",
        "lora: invalid LoraConfig: r=0: expected a positive integer",
    ]:
        assert expected in message
    # cross-field checks run once the fields themselves are right
    with pytest.raises(ConfigError) as info:
        build({"data": {"train": str(data / "missing.jsonl")}, "evaluation": {"every": 5}})
    assert "missing.jsonl': no such file" in str(info.value)
    assert "evaluation.every is set but there is no data.eval" in str(info.value)


def test_the_training_file_is_required():
    with pytest.raises(ConfigError, match="data.train: the training JSONL file is required"):
        build({})


def test_bad_overrides_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="override 'steps': expected section.key=value"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path / "bad.yaml", "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n"))


def test_the_config_round_trips_through_its_yaml(data, tmp_path):
    cfg = load_config(None, [f"data.train={data / 'train.jsonl'}", "lora.r=4"])
    again = load_config(write_yaml(tmp_path / "again.yaml", cfg.to_yaml()))
    assert again == cfg
    assert list(valid_keys()) == ["model", "data", "lora", "training", "evaluation", "output"]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(kind):
    total, warmup = 20, 5
    values = [factor(s, total, warmup, kind, min_ratio=0.1) for s in range(total + 1)]
    assert values[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert values[5] == 1.0
    assert all(a >= b for a, b in zip(values[5:], values[6:]))
    assert values[total] == pytest.approx(1.0 if kind == "constant" else 0.1)
    if kind == "cosine":
        assert values[5 + 15 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 0.10452846326765347))


def test_invalid_utf8_in_the_config_names_file_and_line(data):
    path = data / "run.yaml"
    path.write_bytes(b"data: {train: train.jsonl}\n# caf\xe9 au lait\nlora: {r: 4}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:2: not valid UTF-8 \(byte 0xe9 at column 6\)"):
        load_config(path)


def test_early_stopping_needs_evaluations_during_training(data):
    train = str(data / "train.jsonl")
    with pytest.raises(ConfigError, match="training.early_stopping counts held-out evaluations"):
        build({"data": {"train": train}, "training": {"early_stopping": 2}})
    with pytest.raises(ConfigError, match="training.early_stopping=-1: must not be negative"):
        build({"data": {"train": train}, "training": {"early_stopping": -1}})
    cfg = build({"data": {"train": train, "eval": train}, "evaluation": {"every": 5}})
    assert cfg.output.keep_best is True and cfg.training.early_stopping == 0
