"""``lorakit init``: a starter config with every key, its default and a comment, read from the
schema; the shipped examples with their data; nothing replaced without --force."""

import errno
import os
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

import lorakit.cli.init as init_command
from lorakit.cli.main import main
from lorakit.train.config import TrainConfig, valid_keys
from lorakit.train.config_comments import COMMENTS

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "src" / "lorakit" / "examples"


def test_every_config_key_has_a_comment():
    keys = {f"{s}.{k}" for s, names in valid_keys().items() for k in names} | set(valid_keys())
    assert sorted(keys - set(COMMENTS)) == [], "config keys without a line in config_comments.py"
    assert sorted(set(COMMENTS) - keys) == [], "comments for keys the config no longer has"
    assert all(c and "\n" not in c for c in COMMENTS.values())


def test_the_starter_config_holds_every_key_and_resolves_to_the_defaults(tmp_path, capsys):
    assert main(["init", str(tmp_path / "start")]) == 0
    written = tmp_path / "start.yaml"
    assert "wrote" in capsys.readouterr().out
    text = written.read_text()
    assert yaml.safe_load(text) == TrainConfig().to_dict()  # every key, at its default
    blocks = [block.splitlines() for block in text.strip().split("\n\n")[1:]]  # after the header
    assert [block[0] for block in blocks] == [f"{s}:  # {COMMENTS[s]}" for s in valid_keys()]
    for block, (section, keys) in zip(blocks, valid_keys().items()):
        assert [line.split(":")[0].strip() for line in block[1:]] == keys  # one line a key
        for line, key in zip(block[1:], keys):
            assert line.endswith(f"  # {COMMENTS[f'{section}.{key}']}")

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    assert main(["train", str(written), f"data.train={data}", "--print-config"]) == 0
    from_file = capsys.readouterr().out
    assert main(["train", f"data.train={data}", "--print-config"]) == 0
    assert from_file == capsys.readouterr().out


def test_the_starter_config_follows_the_schema_when_it_runs(tmp_path, monkeypatch):
    """Defaults are read from the config classes when init runs, not kept in a template."""
    import dataclasses

    import lorakit.train.config as config_module

    @dataclasses.dataclass(frozen=True)
    class Training(config_module.TrainingSection):
        lr: float = 0.125

    @dataclasses.dataclass(frozen=True)
    class Config(TrainConfig):
        training: Training = dataclasses.field(default_factory=Training)

    monkeypatch.setattr(config_module, "TrainConfig", Config)
    assert main(["init", str(tmp_path / "x.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "x.yaml").read_text())["training"]["lr"] == 0.125


def test_existing_files_are_replaced_only_with_force(tmp_path, monkeypatch, capsys):
    target = tmp_path / "lorakit.yaml"
    target.write_text("mine\n")
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 2
    assert "lorakit.yaml already exists; pass --force to replace" in capsys.readouterr().err
    assert target.read_text() == "mine\n"
    assert main(["init", "--force"]) == 0
    assert yaml.safe_load(target.read_text()) == TrainConfig().to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lorakit.yaml"]  # no temporary file


def test_the_example_and_its_data_are_written_beside_each_other(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--example", "date_demo"]) == 0
    assert "next: lorakit train date_demo.yaml" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["data/dates/held_out.jsonl", "data/dates/train.jsonl", "date_demo.yaml"]
    for name in written:
        assert (tmp_path / name).read_bytes() == (PACKAGED / name).read_bytes()
    assert main(["train", "date_demo.yaml", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert Path(resolved["data"]["train"]).resolve() == tmp_path / "data/dates/train.jsonl"

    assert main(["init", "--example", "date_demo"]) == 2  # all three exist now
    err = capsys.readouterr().err
    assert "date_demo.yaml, data/dates/train.jsonl, data/dates/held_out.jsonl already exist" in err

    assert main(["init", "sub/demo", "--example", "date_demo"]) == 0  # another name and place
    assert (tmp_path / "sub/demo.yaml").is_file()
    assert (tmp_path / "sub/data/dates/held_out.jsonl").is_file()


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real_fsync, calls = os.fsync, []

    def disk_full_on_the_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(init_command.os, "fsync", disk_full_on_the_second_file)
    assert main(["init", "--example", "date_demo"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the first file nor any temporary file


def test_an_unknown_example_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["init", "--example", "no_such_demo"])
    assert exit_info.value.code == 2
    assert "date_demo" in capsys.readouterr().err  # the choices are listed


def test_the_packaged_examples_are_the_repository_examples():
    """The package ships copies of examples/ (package data): they must not drift apart."""
    packaged = sorted(p.relative_to(PACKAGED) for p in PACKAGED.rglob("*") if p.is_file())
    assert packaged, "no example in the package"
    for relative in packaged:
        message = f"copy examples/{relative} to src/lorakit/examples/{relative}"
        assert (PACKAGED / relative).read_bytes() == (ROOT / "examples" / relative).read_bytes(), (
            message
        )
    for name in ("date_demo.yaml", "data/dates/train.jsonl", "data/dates/held_out.jsonl"):
        assert Path(name) in packaged


def test_package_data_covers_every_packaged_example_file():
    """A non-editable install (a wheel) holds only what pyproject.toml's package-data names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lorakit"]
    for path in PACKAGED.rglob("*"):
        if path.is_file() and path.name != "__pycache__":
            relative = str(path.relative_to(PACKAGED.parent))
            assert any(fnmatch(relative, p) for p in patterns), f"{relative} is not package data"
