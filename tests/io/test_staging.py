"""What a save leaves on disk: directories and files with the modes the umask gives, and no
staging directory, not even after a ``kill -9`` mid-save (the next save cleans it), while the
staging directory of a save still running elsewhere is never touched."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import lorakit
from lorakit import LoraConfig
from lorakit.io import safety, staging
from tiny_models import logits, randomise, tiny_llama, tokens

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))
TESTS = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def staged_in(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, **kwargs)


# -- modes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=["022", "027", "002"])
def test_directories_and_files_get_the_modes_the_umask_gives(tmp_path, mask):
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    old = os.umask(mask)
    try:
        target = tmp_path / "new" / "adapter"  # the parent is created too
        lorakit.save_adapter(model, target)
        first = {p.name: mode(p) for p in target.iterdir()}
        lorakit.save_adapter(model, target, overwrite=True)  # the replacing path too
    finally:
        os.umask(old)
    for directory in (target.parent, target):
        assert mode(directory) == 0o777 & ~mask, directory
    files = {p.name: mode(p) for p in target.iterdir()}
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert first == files == dict.fromkeys(files, 0o666 & ~mask)


# -- the cleaning rule --------------------------------------------------------------------------
HOLD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lorakit.io import safety
    print(safety.staging_dir(Path(sys.argv[1])), flush=True)
    sys.stdin.read()  # hold it until the test closes our input
    """
)


def test_stale_staging_directories_go_and_nothing_else(tmp_path):
    parent = tmp_path
    (parent / "notes.txt").write_text("mine")
    stale = parent / ".adapter.tmp-abcd1234"  # left by a save that was killed
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    other_stale = parent / ".checkpoints.tmp-zz_99xyz"
    other_stale.mkdir()
    keep = {
        ".adapter.old-abcd1234": None,  # the previous adapter of an interrupted replace
        ".mine.tmp-abc": None,  # not the staging form
        ".nested.tmp-abcd1234": "sub",  # holds a subdirectory: not lorakit's
        "adapter.tmp-abcd1234": None,  # not hidden
    }
    for name, sub in keep.items():
        (parent / name).mkdir()
        if sub:
            (parent / name / sub).mkdir()
    in_thread = safety.staging_dir(parent / "busy")  # a save of this process, still running
    holder = python(HOLD, str(parent / "elsewhere"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        in_process = holder.stdout.readline().decode().strip()
        assert ".elsewhere.tmp-" in in_process, in_process
        model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
        lorakit.save_adapter(model, parent / "adapter")
        left = sorted(p.name for p in parent.iterdir())
        assert stale.name not in left and other_stale.name not in left
        assert in_thread.name in left and os.path.basename(in_process) in left
        assert set(keep) <= set(left) and (parent / ".nested.tmp-abcd1234" / "sub").is_dir()
        assert (parent / "notes.txt").read_text() == "mine"
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
    # once its owner has exited, the other process's staging directory is stale too
    safety.discard(in_thread)
    lorakit.save_adapter(model, parent / "adapter", overwrite=True)
    assert staged_in(parent) == sorted(n for n in keep if ".tmp-" in n)


def test_a_staging_directory_held_by_another_thread_survives(tmp_path):
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    made, done = [], threading.Event()

    def save_slowly():
        made.append(safety.staging_dir(tmp_path / "slow"))
        done.wait(timeout=120)
        safety.discard(made[0])

    thread = threading.Thread(target=save_slowly)
    thread.start()
    try:
        while not made:
            time.sleep(0.01)
        for i in range(3):
            lorakit.save_adapter(model, tmp_path / f"quick{i}")
        assert made[0].is_dir()
    finally:
        done.set()
        thread.join()
    assert staged_in(tmp_path) == []


def test_a_save_that_loses_its_new_directory_to_a_cleaner_makes_another(tmp_path, monkeypatch):
    """The cleaner of another save can take a staging directory in the instant between its
    creation and its lock; the save then notices and uses a new one."""
    real, calls = staging.new_dir, []

    def new_dir_then_cleaned(parent, prefix):
        path = real(parent, prefix)
        calls.append(path)
        if len(calls) == 1:
            assert staging.clean(parent) == [path]  # a cleaner running at that moment
        return path

    monkeypatch.setattr(staging, "new_dir", new_dir_then_cleaned)
    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert (logits(loaded, tokens(128)) == logits(model, tokens(128))).all()


def test_without_locks_only_old_staging_directories_go(tmp_path, monkeypatch):
    """Where the file system cannot lock (or on Windows), age decides: a day untouched."""
    monkeypatch.setattr(staging, "fcntl", None)
    old, recent = tmp_path / ".a.tmp-aaaaaaaa", tmp_path / ".b.tmp-bbbbbbbb"
    for path in (old, recent):
        path.mkdir()
    past = time.time() - staging.STALE_AFTER - 60
    os.utime(old, (past, past))
    assert staging.clean(tmp_path) == [old]
    assert recent.is_dir()


# -- kill -9 during a save ----------------------------------------------------------------------
SAVE_FOREVER = textwrap.dedent(
    """
    import sys
    import lorakit
    from tiny_models import randomise, tiny_llama
    config = lorakit.LoraConfig(r=64, target_modules="all-linear")
    model = randomise(lorakit.apply_lora(tiny_llama(), config))
    print("ready", flush=True)
    while True:
        lorakit.save_adapter(model, sys.argv[1], overwrite=True)
    """
)


def test_kill_9_mid_save_leaves_a_staging_directory_the_next_save_removes(tmp_path):
    target = tmp_path / "adapter"
    for _attempt in range(5):
        saver = python(SAVE_FOREVER, str(target), stdout=subprocess.PIPE)
        try:
            assert saver.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + 120
            while not staged_in(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.0005)
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(timeout=60)
        assert saver.returncode == -signal.SIGKILL
        if staged_in(tmp_path):
            break  # killed with its staging directory on disk, as intended
    left = staged_in(tmp_path)
    assert left and left[0].startswith(".adapter.tmp-"), left
    if target.exists():  # killed mid-save, the previous adapter is complete
        lorakit.load_adapter(tiny_llama(), target)

    model = randomise(lorakit.apply_lora(tiny_llama(), CONFIG))
    lorakit.save_adapter(model, tmp_path / "another")  # a save of another name, same parent
    assert staged_in(tmp_path) == []
    assert (tmp_path / "another" / "adapter_model.safetensors").is_file()
