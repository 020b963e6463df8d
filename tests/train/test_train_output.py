"""``output.dir``: a run replaces only what a lorakit run wrote. A directory holding a user's own
``report.md`` or ``summary.json`` is refused with the list of them and left exactly as it was;
``output.overwrite`` starts a lorakit run over and keeps the user's other files."""

from pathlib import Path

import pytest

import lorakit.models
from conftest import char_tokenizer, run, run_config, tiny_llama, write_jsonl
from lorakit.cli.main import main
from lorakit.errors import AdapterFileError
from lorakit.train import TrainingError
from lorakit.train.checkpoint import checkpoints
from lorakit.train.output import MARKER


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_with_the_users_report_is_refused_and_left_as_it_was(tmp_path, overwrite):
    cfg = run_config(tmp_path, output={"overwrite": overwrite})
    out = Path(cfg.output.dir)
    out.mkdir()
    (out / "report.md").write_text("# my own report\n")
    (out / "summary.json").write_text('{"mine": true}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = snapshot(out)
    with pytest.raises(TrainingError) as e:
        run(cfg)
    assert "is not a lorakit run but holds report.md, summary.json" in str(e.value)
    assert "nothing was changed" in str(e.value)
    assert snapshot(out) == before


def test_the_cli_refuses_it_with_a_clean_error(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before output.dir was checked")

    monkeypatch.setattr(lorakit.models, "load_model", refuse)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("# my own report\n")
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}])
    code = main(["train", f"data.train={train}", f"output.dir={out}", "output.plot=false"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert (
        f"lorakit train: error: output.dir '{out}' is not a lorakit run but holds report.md" in err
    )
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_a_directory_with_other_files_takes_the_run_and_keeps_them(tmp_path):
    cfg = run_config(tmp_path, output={"report": True})
    out = Path(cfg.output.dir)
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    run(cfg)
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert (out / "report.md").is_file() and (out / MARKER).is_file()


def test_overwrite_replaces_only_what_a_run_wrote(tmp_path):
    cfg = run_config(
        tmp_path,
        training={"steps": 2, "checkpoint_every": 1},
        output={"report": True, "plot": True},
    )
    out = Path(cfg.output.dir)
    run(cfg)
    (out / "notes.txt").write_text("keep me\n")
    assert len(checkpoints(out)) == 2 and (out / "loss.png").is_file()

    with pytest.raises(TrainingError, match="holds an earlier run"):
        run(cfg)
    again = run_config(tmp_path, output={"overwrite": True, "report": True})
    run(again)
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert checkpoints(out) == [] and not (out / "loss.png").exists()  # nothing stale left
    assert (out / "report.md").is_file() and (out / "adapter").is_dir()


def test_a_run_written_before_the_marker_is_still_recognised(tmp_path):
    cfg = run_config(tmp_path, output={"report": True})
    out = Path(cfg.output.dir)
    tokenizer = char_tokenizer()
    run(cfg, tiny_llama(len(tokenizer)), tokenizer)
    (out / MARKER).unlink()  # a run of an earlier version: metrics.jsonl, report.md, adapter/
    run(run_config(tmp_path, output={"overwrite": True, "report": True}))
    assert (out / MARKER).is_file()


def test_overwrite_refuses_an_adapter_directory_holding_the_users_files(tmp_path):
    cfg = run_config(tmp_path)
    out = Path(cfg.output.dir)
    run(cfg)
    (out / "adapter" / "my_notes.txt").write_text("keep me\n")
    before = snapshot(out)
    with pytest.raises(AdapterFileError, match="my_notes.txt"):
        run(run_config(tmp_path, output={"overwrite": True}))
    assert snapshot(out) == before
