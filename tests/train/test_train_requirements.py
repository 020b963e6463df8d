"""Missing packages are found before any weight loads, and a plot or report that fails after
training never loses the run: ``lorakit train`` runs in a subprocess where a package cannot be
imported (a ``sitecustomize`` blocks it) or is broken (a stand-in that fails on import)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Quiet, char_tokenizer, date_rows, run, run_config, tiny_llama, write_jsonl
from lorakit.train.progress import Console

SRC = Path(__file__).resolve().parents[2] / "src"
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # import fails\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a transformers directory."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def lorakit_train(tmp_path, model_dir, *, blocked=(), broken=None):
    """Run ``lorakit train`` in a fresh Python where ``blocked`` modules cannot be imported and
    ``broken`` (name, error) is a package that raises on import."""
    write_jsonl(tmp_path / "train.jsonl", date_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", date_rows(4, offset=3))
    (tmp_path / "run.yaml").write_text(
        f"model: {{source: {model_dir}}}\ndata: {{train: train.jsonl, eval: eval.jsonl}}\n"
        "training: {steps: 2, batch_size: 4}\nlora: {r: 4}\n"
        "evaluation: {max_new_tokens: 3, before: false}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "sitecustomize.py").write_text(BLOCK.format(names=list(blocked)))
    if broken:
        (shims / broken[0]).mkdir()
        (shims / broken[0] / "__init__.py").write_text(f"raise ImportError({broken[1]!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{shims}{os.pathsep}{SRC}", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "lorakit.cli.main", "train", str(tmp_path / "run.yaml")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "blocked, says, command",
    [
        (["matplotlib"], "matplotlib (output.plot draws loss.png", "pip install 'lorakit[train]'"),
        (["transformers"], "transformers (loading the base model)", "pip install 'lorakit[hf]'"),
        (["yaml"], "pyyaml (reading the training config)", "pip install 'lorakit[train]'"),
        (["matplotlib", "transformers"], "matplotlib", "pip install 'lorakit[hf,train]'"),
    ],
)
def test_a_missing_package_fails_fast_with_the_command_that_installs_it(
    tmp_path, model_dir, blocked, says, command
):
    proc = lorakit_train(tmp_path, model_dir, blocked=blocked)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "lorakit train: error: this run needs package(s) that are not installed" in proc.stderr
    assert says in proc.stderr and command in proc.stderr
    assert "loaded" not in proc.stdout  # no weight was loaded
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_broken_plot_is_a_warning_and_the_run_keeps_its_results(tmp_path, model_dir):
    error = "libfreetype.so.6: cannot open shared object file"
    proc = lorakit_train(tmp_path, model_dir, broken=("matplotlib", error))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: the loss plot (loss.png) was not drawn: ImportError: {error}" in proc.stdout
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "metrics.jsonl").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plot"] is None and "loss.png" in summary["warnings"][0]
    assert summary["after"]["total"] == 4
    assert "## Evaluation" in (out / "report.md").read_text()
    assert not (out / "loss.png").exists()


class TakeReportName:
    """A logger that, when the run closes its loggers, puts a directory where report.md goes."""

    def __init__(self, out):
        self.out = out

    def log(self, kind, step, values):
        pass

    def close(self):
        (self.out / "report.md").mkdir()


def test_a_failed_report_is_a_warning_and_the_summary_is_written(tmp_path):
    cfg = run_config(tmp_path, output={"report": True, "plot": True})
    out = Path(cfg.output.dir)
    console = Quiet()
    result = run(cfg, loggers=[TakeReportName(out)], console=console)
    assert result.warnings and result.warnings[0].startswith("the report (report.md) was not")
    assert any(line.startswith("warning: the report (report.md)") for line in console.lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["warnings"] == result.warnings and summary["plot"] == str(out / "loss.png")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_without_tqdm_a_terminal_gets_plain_lines(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    console = Console(10, bar=True)
    assert console.bar is None
    console.log("train", 1, {"loss": 1.0, "lr": 0.1, "tokens_per_s": 5.0})
    assert "step  1/10  loss 1.0000" in capsys.readouterr().out
