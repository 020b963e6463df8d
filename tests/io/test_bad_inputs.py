"""Adapter files with values no model should take, paths no file system can hold, and disks that
fill up: each is one ``AdapterFileError`` that names the file, key or path, with the model and the
files on disk exactly as they were."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from io_models import adapter_state, assert_refused, model_state, rewrite, snapshot

import lorakit
from lorakit import AdapterError, AdapterFileError, LoraConfig
from lorakit.io import safety
from tiny_models import logits, randomise, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
FINGERPRINT = "lorakit.fingerprint"
SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.fixture
def saved(tmp_path):
    """An adapter directory saved from a tiny Llama, and the model that saved it."""
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def poison(value):
    def change(tensors):
        tensors[B0][3, 1] = value
        tensors[A1][0, :5] = value

    return change


def run_python(script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, timeout=300, env=env, **kwargs
    )


# -- values that are not numbers ----------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(saved, value):
    directory, _ = saved
    rewrite(directory, poison(value))
    message = assert_refused(directory, AdapterFileError, "not finite numbers")
    assert str(directory / "adapter_model.safetensors") in message
    kind = "1 NaN and 0 infinite" if value != value else "0 NaN and 1 infinite"
    assert f"{B0}: {kind} of 256 values" in message
    assert f"{A1}: " in message
    # into an adapter the model already has: refused, its values untouched
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=5)
    before = adapter_state(model)
    assert_refused(directory, AdapterFileError, "not finite numbers", model=model)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())


def test_hotswap_refuses_non_finite_values(saved, tmp_path):
    directory, model = saved
    served = lorakit.load_adapter(tiny_llama(), directory)
    other = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=7)
    lorakit.save_adapter(other, tmp_path / "next")
    rewrite(tmp_path / "next", poison(float("nan")))
    before, x = adapter_state(served), tokens(128)
    with pytest.raises(AdapterFileError, match="not finite numbers") as info:
        lorakit.hotswap_adapter(served, tmp_path / "next")
    assert f"{B0}: 1 NaN and 0 infinite of 256 values" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(served).items())
    assert torch.equal(logits(served, x), logits(model, x))


def test_values_beyond_the_range_of_the_model_s_dtype_are_refused(saved, tmp_path):
    """Finite in the file (float64), infinite once copied into the float32 adapter."""
    directory, model = saved

    def huge(tensors):
        tensors[B0] = tensors[B0].double()
        tensors[B0][0, 0] = 1e300

    rewrite(directory, huge)
    message = assert_refused(directory, AdapterFileError, "beyond torch.float32's range")
    assert f"{B0}: values beyond" in message
    served = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=5)
    before = adapter_state(served)
    with pytest.raises(AdapterFileError, match=f"{B0}: values beyond torch.float32's range"):
        lorakit.hotswap_adapter(served, directory)
    # a scale so large that B, folded by the swap, leaves float32's range
    lorakit.save_adapter(model, tmp_path / "loud")
    config_path = tmp_path / "loud" / "adapter_config.json"
    config_path.write_text(
        config_path.read_text().replace('"lora_alpha": 8', '"lora_alpha": 1e300')
    )
    with pytest.raises(AdapterFileError, match=f"{B0}: values beyond torch.float32's range"):
        lorakit.hotswap_adapter(served, tmp_path / "loud")
    assert all(torch.equal(before[k], v) for k, v in adapter_state(served).items())


# -- fingerprints that cannot be read -----------------------------------------------------------
BAD_FINGERPRINTS = {
    "not JSON": "{'modules': ",
    "empty": "",
    "a list": "[1, 2]",
    "no modules": '{"architecture": "LlamaForCausalLM"}',
    "modules a number": '{"modules": 5}',
    "shape an int": '{"modules": {"model.layers.0.self_attn.q_proj": 64}}',
    "shape of strings": '{"modules": {"model.layers.0.self_attn.q_proj": ["64", "64"]}}',
    "architecture a number": '{"architecture": 7, "modules": {}}',
    "nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("text", list(BAD_FINGERPRINTS.values()), ids=list(BAD_FINGERPRINTS))
def test_an_unreadable_fingerprint_is_an_error_not_a_skipped_check(saved, text):
    directory, model = saved
    rewrite(directory, metadata={FINGERPRINT: text})
    message = assert_refused(directory, AdapterFileError, "cannot be checked")
    assert f"{directory / 'adapter_model.safetensors'}: metadata {FINGERPRINT!r}" in message
    assert "allow_base_mismatch=True" in message
    with pytest.raises(AdapterFileError, match=FINGERPRINT):
        lorakit.inspect_adapter(directory)
    # asked for, the adapter loads without the check, and says so
    with pytest.warns(UserWarning, match="without checking the base model"):
        loaded = lorakit.load_adapter(tiny_llama(), directory, allow_base_mismatch=True)
    assert torch.equal(logits(loaded, tokens(128)), logits(model, tokens(128)))
    before = adapter_state(loaded)
    with pytest.raises(AdapterFileError, match="cannot be checked"):
        lorakit.hotswap_adapter(loaded, directory)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(loaded).items())
    with pytest.warns(UserWarning, match="without checking the base model"):
        lorakit.hotswap_adapter(loaded, directory, allow_base_mismatch=True)


def test_a_fingerprint_with_shapes_as_ints_names_the_module(saved):
    directory, _ = saved
    rewrite(directory, metadata={FINGERPRINT: BAD_FINGERPRINTS["shape an int"]})
    message = assert_refused(directory, AdapterFileError, "expected a list of sizes or null")
    assert "modules['model.layers.0.self_attn.q_proj'] is 64" in message


# -- JSON nested without end --------------------------------------------------------------------
def deep(depth: int) -> str:
    return '{"r": 4, "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [100_000, 70])
def test_a_config_nested_too_deep_is_refused(saved, depth):
    directory, _ = saved
    path = directory / "adapter_config.json"
    path.write_text(deep(depth))
    message = assert_refused(directory, AdapterFileError, "nests deeper than 64 levels")
    assert str(path) in message
    with pytest.raises(AdapterFileError, match="nests deeper"):
        lorakit.inspect_adapter(directory)


@pytest.mark.parametrize("task", [["CAUSAL_LM"], {"a": 1}, 5])
def test_a_task_type_that_is_not_a_string(saved, task):
    directory, _ = saved
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": task}))
    message = assert_refused(directory, AdapterFileError, "task_type is .*; expected a string")
    assert str(path) in message


def test_lorakit_config_metadata_nested_too_deep_is_refused(saved):
    directory, _ = saved
    rewrite(directory, metadata={"lorakit.config": "[" * 100_000 + "]" * 100_000})
    message = assert_refused(directory, AdapterFileError, "nests deeper")
    assert "metadata 'lorakit.config'" in message


def test_cli_inspect_of_a_config_nested_too_deep_is_a_clean_error(saved):
    directory, _ = saved
    (directory / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    script = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
    run = run_python(script, "inspect", str(directory))
    err = run.stderr.decode()
    assert run.returncode == 2, err[-2000:]  # the CLI's exit status for lorakit errors
    assert "Traceback" not in err and "RecursionError" not in err
    assert f"lorakit inspect: error: {directory / 'adapter_config.json'} nests deeper" in err


# -- paths no file system can hold --------------------------------------------------------------
def test_names_too_long_for_the_file_system(saved, tmp_path):
    directory, model = saved
    long = "x" * 10_000
    before = snapshot(tmp_path)
    with pytest.raises(AdapterFileError, match="subfolder .* 10000 bytes long; file systems"):
        lorakit.load_adapter(tiny_llama(), tmp_path, subfolder=long)
    for call in (
        lambda: lorakit.load_adapter(tiny_llama(), tmp_path / long),
        lambda: lorakit.inspect_adapter(tmp_path / long),
        lambda: lorakit.save_adapter(model, tmp_path / long),
    ):
        with pytest.raises(AdapterFileError, match=r"adapter directory .* 10000 bytes long"):
            call()
    with pytest.raises(AdapterError, match="not allowed"):
        lorakit.save_adapter(model, tmp_path / "b", long)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # a long name that fits is fine: its hidden staging directory is named within the limit
    fits = tmp_path / ("y" * 250)
    lorakit.save_adapter(model, fits)
    lorakit.save_adapter(model, fits, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", fits.name]


def test_a_nul_byte_in_a_directory_name(saved, tmp_path):
    directory, model = saved
    bad = str(tmp_path / "a\0b")
    model_before = model_state(model)
    for call in (
        lambda: lorakit.save_adapter(model, bad),
        lambda: lorakit.load_adapter(tiny_llama(), bad),
        lambda: lorakit.inspect_adapter(bad),
        lambda: lorakit.hotswap_adapter(model, bad),
    ):
        with pytest.raises(AdapterFileError, match=r"'.*a\\x00b' contains a NUL byte"):
            call()
    with pytest.raises(AdapterFileError, match="not allowed"):
        lorakit.load_adapter(tiny_llama(), tmp_path, subfolder="adapter\0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert model_state(model) == model_before


# -- legacy files that are not torch files ------------------------------------------------------
@pytest.mark.parametrize("content", [b"hello, this is text\n", b"", b"PK\x03\x04garbage"])
def test_a_bin_file_that_is_not_a_torch_file(saved, content):
    directory, _ = saved
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(content)
    message = assert_refused(directory, AdapterFileError, "refused by torch.load", allow_bin=True)
    assert str(directory / "adapter_model.bin") in message


# -- full disks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["write_tensors", "write_file", "publish"])
def test_disk_full_names_the_directory_and_leaves_nothing(saved, monkeypatch, where):
    directory, model = saved
    before = snapshot(directory.parent)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safety, where, full)
    new = randomise(lorakit.apply_lora(tiny_llama(), CONFIG), seed=9)
    for target in (directory, directory.parent / "fresh"):
        with pytest.raises(AdapterFileError) as info:
            lorakit.save_adapter(new, target, overwrite=True)
        assert str(info.value) == (
            f"cannot save the adapter to {target}: no space left on device; nothing was changed"
        )
    assert snapshot(directory.parent) == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["adapter"]


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import lorakit
    from lorakit import LoraConfig
    sys.path.insert(0, sys.argv[2])
    from tiny_models import logits, randomise, tiny_llama, tokens

    root = Path(sys.argv[1])
    small = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=1, target_modules=["q_proj"])))
    lorakit.save_adapter(small, root / "adapter")
    big = randomise(lorakit.apply_lora(tiny_llama(), LoraConfig(r=64, target_modules="all-linear")))
    try:
        lorakit.save_adapter(big, root / "adapter", overwrite=True)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    loaded = lorakit.load_adapter(tiny_llama(), root / "adapter")
    same = bool((logits(loaded, tokens(128)) == logits(small, tokens(128))).all())
    print(json.dumps({"error": error, "left": sorted(os.listdir(root)), "same": same}))
    """
)


def test_a_really_full_disk(tmp_path):
    """A 64 KiB tmpfs (mounted in a user namespace of its own) fills up during the save."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare command")
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {probe.stderr.decode()[:200]}")
    tests = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "HF_HUB_OFFLINE": "1"}
    command = f'mount -t tmpfs -o size=64k tmpfs {mount} && exec {sys.executable} -c "$0" "$1" "$2"'
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", command, FULL_DISK_SCRIPT, str(mount), tests],
        capture_output=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    result = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert result["error"] == (
        f"AdapterFileError: cannot save the adapter to {mount / 'adapter'}: no space left on "
        "device; nothing was changed"
    )
    assert result["left"] == ["adapter"]  # no staging directory
    assert result["same"]  # the previous adapter, whole
