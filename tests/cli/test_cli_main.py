"""The command line's common behaviour (``lorakit.cli.main``): a closed output pipe, error messages
that name flags, help texts and usage lines."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig

import lorakit
from lorakit.cli.main import BROKEN_PIPE_STATUS, build_parser, command_parser, commands, main
from tiny_models import LLAMA, tiny_llama

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def lorakit_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "lorakit.cli.main", *argv]


@pytest.fixture
def adapter(tmp_path):
    """An adapter directory for a tiny Llama saved under tmp_path/base."""
    tiny_llama().save_pretrained(tmp_path / "base")
    lorakit.save_adapter(lorakit.apply_lora(tiny_llama(), CONFIG), tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture
def deep_base(tmp_path):
    """A config-only Llama directory of 100 layers: its plan in JSON (~200 KB) outgrows a pipe's
    buffer (64 KiB), so the command is still writing when the reader goes away."""
    LlamaConfig(**{**LLAMA, "num_hidden_layers": 100}).save_pretrained(tmp_path / "deep")
    return tmp_path / "deep"


def assert_quiet(status: int, stderr: bytes, statuses=(BROKEN_PIPE_STATUS,)) -> None:
    err = stderr.decode()
    assert status in statuses, err[-2000:]
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err


@pytest.mark.parametrize("reader", ["head -c1", "one line"])
def test_a_reader_that_stops_early_ends_the_command_quietly(deep_base, reader):
    if reader == "head -c1":
        reader_argv = ["head", "-c1"]
    else:  # reads one line, then closes its end of the pipe
        reader_argv = [
            sys.executable,
            "-c",
            "import sys; print(sys.stdin.readline()); sys.stdin.close()",
        ]
    writer = subprocess.Popen(
        lorakit_command("inspect", str(deep_base), "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    head = subprocess.run(reader_argv, stdin=writer.stdout, capture_output=True, timeout=300)
    writer.stdout.close()  # the reader holds the only read end now
    stderr = writer.stderr.read()
    writer.wait(timeout=300)
    assert head.returncode == 0 and head.stdout.startswith(b"{")
    assert_quiet(writer.returncode, stderr)


def test_output_buffered_until_exit_meets_a_closed_pipe_quietly(adapter):
    """A short output is written only by the last flush: the pipe has no reader left by then."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    run = subprocess.run(
        lorakit_command("inspect", str(adapter), "--json"),
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=ENV,
        timeout=300,
    )
    os.close(write_end)
    assert_quiet(run.returncode, run.stderr)


def test_help_into_a_closed_pipe_is_quiet():
    read_end, write_end = os.pipe()
    os.close(read_end)
    run = subprocess.run(
        lorakit_command("merge", "--help"), stdout=write_end, stderr=subprocess.PIPE, timeout=300
    )
    os.close(write_end)
    # argparse itself drops an error writing help on newer Pythons (3.11.7+: status 0)
    assert_quiet(run.returncode, run.stderr, statuses=(0, BROKEN_PIPE_STATUS))


def test_errors_name_the_flag_not_the_keyword_argument(adapter, tmp_path, capsys):
    base, out = tmp_path / "base", tmp_path / "out"
    assert main(["merge", str(base), str(adapter), str(out)]) == 0
    assert main(["merge", str(base), str(adapter), str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err

    tiny_llama(seed=1).save_pretrained(tmp_path / "other")  # another base: another fingerprint
    assert main(["merge", str(tmp_path / "other"), str(adapter), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "pass --allow-base-mismatch to load it anyway" in err
    assert "allow_base_mismatch" not in err
    argv = ["merge", str(tmp_path / "other"), str(adapter), str(tmp_path / "o2")]
    assert main([*argv, "--allow-base-mismatch"]) == 0
    err = capsys.readouterr().err
    assert "lorakit merge: warning: the adapter at" in err  # one line of lorakit's, no traceback
    assert "loading it anyway (--allow-base-mismatch)" in err
    assert "allow_base_mismatch" not in err and "UserWarning" not in err


def test_a_legacy_bin_adapter_names_the_allow_bin_flag(adapter, capsys):
    from safetensors.torch import load_file

    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")
    weights.unlink()
    assert main(["inspect", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "Pass --allow-bin to read it" in err and "allow_bin" not in err
    assert main(["inspect", str(adapter), "--allow-bin"]) == 0
    assert "r=4 alpha=8" in capsys.readouterr().out


def test_plan_errors_name_the_plan_options(adapter, tmp_path, capsys):
    base = str(tmp_path / "base")
    assert main(["inspect", base, "--target", "q_proj", "nothing_here"]) == 2
    assert "--target entry 'nothing_here' matches no module" in capsys.readouterr().err
    assert main(["inspect", base, "--target-regex", "("]) == 2
    assert "--target-regex '(' is not a valid regular expression" in capsys.readouterr().err
    assert main(["inspect", base, "--modules-to-save", "nope"]) == 2
    assert "--modules-to-save entry 'nope' matches no module" in capsys.readouterr().err
    assert main(["inspect", base, "--alpha", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--alpha -1.0: expected a positive" in err and "alpha=" not in err


def test_only_the_names_of_flags_are_rewritten():
    from lorakit.cli.main import with_flags

    parser = command_parser(build_parser(), "eval")
    keywords = {"r": "--r", "batch_size": "--batch-size"}
    for text in (
        "training.batch_size=0: must be greater than 0",  # a config key, not a flag
        "scaled by alpha / r; r must be an integer",  # words, not the name=value form
        "--no-chat-template=True",
    ):
        assert with_flags(text, parser, keywords) == text
    assert with_flags("r=0 and batch_size is 0", parser, keywords) == "--r 0 and --batch-size is 0"


# Every keyword argument a library error suggests, and the commands that can meet that error.
HINTS = {
    "overwrite": ["merge"],
    "allow_base_mismatch": ["merge", "generate", "eval", "chat"],
    "allow_bin": ["inspect", "generate", "eval", "chat"],
}


@pytest.mark.parametrize(
    "keyword, command", [(k, c) for k, cs in HINTS.items() for c in cs], ids=str
)
def test_every_suggested_keyword_is_a_flag_of_the_command(keyword, command):
    from lorakit.cli.main import with_flags

    parser = command_parser(build_parser(), command)
    flag = "--" + keyword.replace("_", "-")
    assert with_flags(f"x; pass {keyword}=True to go on", parser) == f"x; pass {flag} to go on"
    assert with_flags("torch.load(weights_only=True)", parser) == "torch.load(weights_only=True)"


@pytest.mark.parametrize("command", ["", *(name.replace("_", "-") for name in commands())])
def test_every_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lorakit" in out
    assert "``" not in out and ":mod:" not in out and ":class:" not in out and ":func:" not in out
    assert "[[" not in out  # a repeated optional group: an ambiguous usage line


def test_merge_usage_names_each_path_once(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert usage == "usage: lorakit merge [options] [BASE] ADAPTER OUT"
