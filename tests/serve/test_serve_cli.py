"""``lorakit serve`` as a user runs it: a real process on a free port, answering the openai
client, stopping cleanly on SIGINT and SIGTERM with status 0; bad flags are clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import lorakit
from serving import free_port


def lorakit_cmd(*args):
    return [sys.executable, "-m", "lorakit.cli.main", *args]


def wait_up(proc, url, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.mark.parametrize("sig, grace, new", [(signal.SIGINT, "60", 40), (signal.SIGTERM, "0", 500)])
def test_serve_runs_answers_and_stops_cleanly_on_a_signal(served, sig, grace, new):
    """A signal stops the server: a running stream finishes within the grace period (SIGINT
    case), or is ended with an error event and [DONE] when the grace is over (SIGTERM case);
    either way the process exits 0 with no traceback."""
    import openai

    base_dir, adapters = served
    port = free_port()
    proc = subprocess.Popen(
        lorakit_cmd(
            "serve",
            str(base_dir),
            "--adapters",
            str(adapters),
            "--port",
            str(port),
            "--grace",
            grace,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "LORAKIT_API_KEY": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(proc, url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert {m.id for m in client.models.list().data} >= {"alpha", "beta", "gamma"}
        stream = client.completions.create(
            model="gamma",
            prompt="a",
            max_tokens=new,
            stream=True,
            temperature=0,
            extra_body={"ignore_eos": new == 500},  # the long one runs its 500 tokens
        )
        chunks = iter(stream)
        if new == 500:
            # no grace: cancelled long before 500 steps are done; the signal may come before the
            # request had its row (its adapter still loading), or after its first tokens
            proc.send_signal(sig)
            said = "shut down before the (answer|request was started)"
            with pytest.raises(openai.APIError, match=said):
                list(chunks)
        else:
            next(chunks)
            proc.send_signal(sig)
        if new == 40:
            rest = list(chunks)
            assert rest[-1].choices[0].finish_reason in ("stop", "length")
        elif new != 500:
            with pytest.raises(openai.APIError, match="shut down before the answer"):
                list(chunks)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "listening on http://127.0.0.1" in output
    assert "Traceback" not in output


def test_serve_binds_loopback_by_default_and_documents_its_flags():
    out = subprocess.run(lorakit_cmd("serve", "--help"), capture_output=True, text=True)
    assert out.returncode == 0
    for flag in (
        "--adapters",
        "--adapter",
        "--host",
        "--port",
        "--quantize",
        "--dtype",
        "--device",
        "--api-key",
        "--admin-key",
        "--max-loras",
        "--max-lora-memory",
        "--max-seqs",
        "--max-waiting",
        "--max-prompt-tokens",
        "--max-tokens",
        "--max-body-bytes",
    ):
        assert flag in out.stdout, flag
    assert "default 127.0.0.1" in out.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--adapters", "/no/such/dir"], "not a directory"),
        (["--adapter", "oops"], "expected NAME=PATH"),
        (["--max-loras", "0"], "--max-loras must be at least 1"),
    ],
)
def test_bad_flags_are_clear_errors(served, args, says):
    base_dir, _ = served
    out = subprocess.run(
        lorakit_cmd("serve", str(base_dir), *args), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert says in out.stderr
    assert "Traceback" not in out.stderr


def test_import_lorakit_imports_no_web_framework():
    code = (
        "import sys, lorakit, lorakit.sampling, lorakit.cli.main as m; m.build_parser(); "
        "print(sorted(k for k in ('fastapi', 'uvicorn', 'pydantic', 'starlette', 'openai') "
        "if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
    assert lorakit.__version__
