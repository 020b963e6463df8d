"""Damaged checkpoints and metrics on ``training.resume=true``, a full disk while writing a
checkpoint, and the modes of what a checkpoint writes: each is named, the run resumes from the
newest intact checkpoint when one is kept, and nothing is left half-written."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import Crash, CrashAt, Quiet, resumed, run, run_config
from lorakit.train import checkpoint
from lorakit.train.checkpoint import PREFIX, TMP_PREFIX, CheckpointError, checkpoints
from lorakit.train.metrics import MetricsError, read_metrics

# checkpoints at steps 2 and 4 (both kept); the run dies at step 5 of 6
SECTIONS = {"training": {"steps": 6, "checkpoint_every": 2, "threads": 1}}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The losses of the same run, never interrupted."""
    return run(run_config(tmp_path_factory.mktemp("whole"), **SECTIONS)).losses


def crashed_run(tmp_path):
    cfg = run_config(tmp_path, **SECTIONS)
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(5)])
    out = Path(cfg.output.dir)
    assert [p.name for p in checkpoints(out)] == [f"{PREFIX}000002", f"{PREFIX}000004"]
    return cfg, out


class Evil:
    """Unpickling this runs code: ``weights_only=True`` must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > /dev/null",))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"\x07not a checkpoint at all\xff" * 40)


def without_optimizer(path):
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)


def without_a_moment(path):
    state = torch.load(path, weights_only=True)
    del state["optimizer"]["state"][0]["exp_avg"]
    torch.save(state, path)


def with_an_object(path):
    state = torch.load(path, weights_only=False)
    state["notes"]["extra"] = Evil()
    torch.save(state, path)


def wrong_shape(path):
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, path)


def with_nan(path):
    tensors = load_file(path)
    tensors[sorted(tensors)[0]][0] = float("nan")
    save_file(tensors, path)


def removed(path):
    path.unlink()


# (file damaged, how, what the error says)
DAMAGE = {
    "truncated tensors": ("trainable.safetensors", truncate, "not a readable safetensors file"),
    "garbage tensors": ("trainable.safetensors", garbage, "not a readable safetensors file"),
    "wrong shape": ("trainable.safetensors", wrong_shape, "has shape"),
    "NaN tensor": ("trainable.safetensors", with_nan, "NaN or infinite values"),
    "truncated state": ("state.pt", truncate, "not a torch checkpoint file"),
    "garbage state": ("state.pt", garbage, "not a torch checkpoint file"),
    "incomplete state": ("state.pt", without_optimizer, "'optimizer' is missing"),
    "incomplete optimizer": ("state.pt", without_a_moment, "per-parameter states are incomplete"),
    "pickled object": ("state.pt", with_an_object, "refused: it holds objects other than"),
    "missing state": ("state.pt", removed, "incomplete checkpoint, missing state.pt"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumes(tmp_path, whole, case):
    name, damage, says = DAMAGE[case]
    cfg, out = crashed_run(tmp_path)
    newest, older = checkpoints(out)[1], checkpoints(out)[0]
    damage(newest / name)

    console = Quiet()
    again = run(resumed(cfg), console=console)
    told = "\n".join(console.lines)
    assert f"{newest}" in told and says in told, told
    assert f"resuming from the newest intact checkpoint, {older.name}" in told
    assert again.start_step == 2
    assert again.losses == {s: whole[s] for s in range(3, 7)}  # the same run, continued exactly


@pytest.mark.parametrize("case", DAMAGE)
def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path, case):
    name, damage, says = DAMAGE[case]
    cfg, out = crashed_run(tmp_path)
    for path in checkpoints(out):
        damage(path / name)
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as e:
        run(resumed(cfg))
    for path in checkpoints(out):
        assert f"{path}" in str(e.value)
    assert str(e.value).count(says) == 2
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing changed


@pytest.mark.parametrize("bad", [b"{not json\n", b'{"kind": "train", "step": "\xff\xfe"}\n'])
def test_a_damaged_metrics_line_is_named(tmp_path, bad):
    cfg, out = crashed_run(tmp_path)
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (out / "metrics.jsonl").write_bytes(lines[0] + bad + b"".join(lines[1:]))
    with pytest.raises(MetricsError, match=r"metrics.jsonl:2: damaged metrics record"):
        run(resumed(cfg))
    assert len(read_metrics_lines(out)) == len(lines) + 1  # left as it was


def read_metrics_lines(out):
    return (out / "metrics.jsonl").read_bytes().splitlines()


def test_a_line_cut_off_at_the_end_is_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"kind": "train", "step": 1, "time": 0}\n{"kind": "tr')
    assert read_metrics(path) == [{"kind": "train", "step": 1, "time": 0}]


class FullDisk:
    """A real file on which the disk fills up after ``room`` bytes, as ``write(2)`` does."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data)[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.mark.parametrize("file", ["trainable.safetensors", "state.pt"])
def test_a_full_disk_while_writing_a_checkpoint_says_so_and_leaves_nothing(
    tmp_path, monkeypatch, file
):
    def full_disk_open(path, mode="r", *args, **kwargs):
        opened = open(path, mode, *args, **kwargs)
        return FullDisk(opened, room=100) if Path(path).name == file else opened

    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    cfg = run_config(tmp_path, training={"steps": 4, "checkpoint_every": 2})
    out = Path(cfg.output.dir)
    with pytest.raises(CheckpointError) as e:
        run(cfg)
    assert "no space left on device" in str(e.value)
    assert f"checkpoint {PREFIX}000002 in {out}" in str(e.value)
    assert not [p.name for p in out.iterdir() if p.name.startswith((TMP_PREFIX, PREFIX))]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_modes_the_umask_gives(tmp_path, umask):
    cfg = run_config(tmp_path, training={"steps": 2, "checkpoint_every": 2})
    old = os.umask(umask)
    try:
        run(cfg)
    finally:
        os.umask(old)
    (saved,) = checkpoints(Path(cfg.output.dir))
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~umask
    for name in ("trainable.safetensors", "state.pt"):
        assert stat.S_IMODE((saved / name).stat().st_mode) == 0o666 & ~umask
    for path in Path(cfg.output.dir).iterdir():  # metrics.jsonl, the marker, the adapter's files
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
