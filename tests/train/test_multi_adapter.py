"""Many adapters in one run (``adapters:`` in the config): each adapter equals its own run alone.

Three adapters with different data, ranks and target modules train in one run on one base. Each
saved adapter and each adapter's logged losses equal those of a one-adapter run with the same
settings and data: through the CLI with SGD, in code with AdamW (per-adapter clipping and
held-out keep-best too), under torchrun with DDP and FSDP2 (2 processes equal 1), and stopped
and resumed (equal to uninterrupted). Config problems are named ``adapters.NAME.section.key``.

Tolerance: the run's batch is padded to the widest row of all the adapters, so the sums inside
attention and the loss run in another order than in a run alone; in float32 that moves losses by
about 1e-7 and the adapters after a few steps by less than 1e-6 (their values are about 1e-2).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit
from char_tokenizer import char_tokenizer
from conftest import Crash, CrashAt, Quiet, command, environment, tiny_llama, write_jsonl
from lorakit.errors import ConfigError
from lorakit.train import train
from lorakit.train.config import build, load_config

RUN_TIMEOUT = 240  # seconds, one run of a few steps on a 2-core machine
# the combined batch is padded to the widest row of all the adapters, so sums run in another
# order than a run alone; on AVX2 kernels losses 1.5e-5 apart (relative) were seen
TOL = dict(rtol=1e-3, atol=1e-4)  # AdamW with tight clipping amplifies those roundings
NAMES = ("acme", "globex", "initech")
LORAS = {  # different ranks and target modules
    "acme": {"r": 4},
    "globex": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    "initech": {"r": 8, "alpha": 4, "target_modules": ["down_proj", "o_proj"]},
}
SIZES = {"acme": 12, "globex": 20, "initech": 7}  # rows: each adapter's stream wraps differently
TRAINING = {"steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 5e-2, "log_every": 1}


def rows(name: str, n: int) -> list[dict]:
    """A task of the adapter's own: the answer repeats the question's letter."""
    k = name[0]
    return [{"prompt": f"{k}{i % 7}", "completion": k * (i % 3 + 1)} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base as a model directory, and each adapter's training and held-out files."""
    root = tmp_path_factory.mktemp("multi")
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for name in NAMES:
        write_jsonl(root / f"{name}.jsonl", rows(name, SIZES[name]))
        write_jsonl(root / f"{name}-eval.jsonl", rows(name, 4))
    return root


def common(root: Path, out: str, **training) -> dict:
    return {
        "model": {"source": str(root / "base")},
        "data": {"max_length": 64},
        "lora": {"alpha": 8},
        "training": {**TRAINING, "optimizer": "sgd", "threads": 1, **training},
        "evaluation": {"before": True, "max_new_tokens": 3},
        "output": {"dir": str(root / out), "plot": False},
    }


def many_config(root: Path, out: str, **training) -> Path:
    raw = common(root, out, **training)
    raw["adapters"] = {
        n: {"data": {"train": f"{n}.jsonl", "eval": f"{n}-eval.jsonl"}, "lora": LORAS[n]}
        for n in NAMES
    }  # paths relative to the config file
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def alone_config(root: Path, name: str, out: str) -> Path:
    raw = common(root, out)
    raw["data"].update(train=f"{name}.jsonl", eval=f"{name}-eval.jsonl")
    raw["lora"].update(LORAS[name])
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(processes: int, cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command(processes, cfg, *overrides),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def losses(metrics: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def assert_same(got: Path, want: Path) -> None:
    """Two runs' adapter directories (``.../adapter``'s parent) hold the same training."""
    a, b = losses(got / "metrics.jsonl"), losses(want / "metrics.jsonl")
    assert sorted(a) == sorted(b) and a
    torch.testing.assert_close(
        torch.tensor(list(a.values())), torch.tensor(list(b.values())), **TOL
    )
    ta = load_file(str(got / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(want / "adapter" / "adapter_model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], **TOL, msg=key)
    config = "adapter_config.json"
    assert (got / "adapter" / config).read_text() == (want / "adapter" / config).read_text()


@pytest.fixture(scope="module")
def many(files):
    """The one-process run of the three adapters, through the CLI."""
    done = cli(1, many_config(files, "many"))
    return files / "many", done.stdout


def test_each_adapter_of_one_run_equals_its_own_run_alone_through_the_cli(files, many):
    out, stdout = many
    assert "3 adapters (acme, globex, initech)" in stdout
    for name in NAMES:
        cli(1, alone_config(files, name, f"alone-{name}"))
        assert_same(out / "adapters" / name, files / f"alone-{name}")


def test_the_run_writes_each_adapters_outputs_and_a_summary(files, many):
    out, stdout = many
    for name in NAMES:
        own = out / "adapters" / name
        assert {p.name for p in own.iterdir()} >= {"adapter", "metrics.jsonl", "report.md"}
        report = (own / "report.md").read_text()
        assert report.startswith(f"# lorakit training report: {name}\n")
        assert "trained in one run with 3 adapters (acme, globex, initech)" in report
        peft_config = json.loads((own / "adapter" / "adapter_config.json").read_text())
        assert peft_config["r"] == LORAS[name].get("r")
        model, _ = lorakit.models.load_model(str(files / "base"))
        lorakit.load_adapter(model, own / "adapter")  # the base's fingerprint matches
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(
        lorakit.models.load_model(str(files / "base"))[0], out / "adapters" / "globex" / "adapter"
    )
    assert peft_model.peft_config["default"].r == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [a["adapter"] for a in summary["adapters"]] == list(NAMES)
    for a in summary["adapters"]:
        assert a["train_rows"] == SIZES[a["adapter"]] and a["steps"] == TRAINING["steps"]
        assert a["loss_last"] < a["loss_first"] and a["heldout_after"] < a["heldout_before"]
        assert a["exact_before"] is not None and a["exact_after"] is not None
    table = (out / "summary.md").read_text()
    assert "| [globex](adapters/globex/report.md) | 20 | 2 | 4 |" in table
    assert not (out / "adapter").exists()  # no one-adapter outputs at the top


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_the_one_process_run(files, many, mode):
    """FSDP2 with gradient checkpointing too: the recomputed forward needs the rows' adapters."""
    checkpointing = "true" if mode == "fsdp" else "false"
    cfg = many_config(files, f"many-{mode}", distributed=mode)
    cfg.write_text(
        cfg.read_text().replace(
            "threads: 1", f"threads: 1\n  gradient_checkpointing: {checkpointing}"
        )
    )
    done = cli(2, cfg)
    assert f"2 processes ({mode}, gloo)" in done.stdout
    for name in NAMES:
        assert_same(files / f"many-{mode}" / "adapters" / name, many[0] / "adapters" / name)
    model, _ = lorakit.models.load_model(str(files / "base"))
    lorakit.load_adapter(model, files / f"many-{mode}" / "adapters" / "initech" / "adapter")


def test_a_checkpoint_of_two_processes_resumes_in_one(files, many):
    """FSDP2 on 2 processes, stopped after step 2 (its later checkpoint and adapters removed),
    resumed in one process: every adapter equals the one-process run never interrupted."""
    cfg = many_config(files, "moved", distributed="fsdp", checkpoint_every=2)
    cli(2, cfg)
    shutil.rmtree(files / "moved" / "checkpoint-000004")
    for name in NAMES:
        shutil.rmtree(files / "moved" / "adapters" / name / "adapter")
    done = cli(1, cfg, "training.resume=true")
    assert "resumed from checkpoint-000002 at step 2 of 4" in done.stdout
    for name in NAMES:
        assert_same(files / "moved" / "adapters" / name, many[0] / "adapters" / name)


# -- in code: AdamW, clipping that bites, keep-best; resume --------------------------------------


def in_code(tmp: Path, adapters: dict, out: str, **sections):
    tmp.mkdir(parents=True, exist_ok=True)
    raw = {
        "data": {"max_length": 64},
        "lora": {"alpha": 8},
        "training": {**TRAINING, "max_grad_norm": 0.05, "threads": 1},
        "evaluation": {"before": False, "max_new_tokens": 2, "exact_match": False},
        "output": {"dir": str(tmp / out), "plot": False, "report": False},
    }
    for key, values in sections.items():
        raw[key] = {**raw[key], **values}
    specs = {}
    for name, own in adapters.items():
        train_file = write_jsonl(tmp / f"{name}.jsonl", rows(name, SIZES[name]))
        eval_file = write_jsonl(tmp / f"{name}-eval.jsonl", rows(name, 4))
        specs[name] = {"data": {"train": train_file, "eval": eval_file}, **own}
    return raw, specs


def run(cfg, loggers=None):
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    return train(cfg, model=model, tokenizer=tokenizer, loggers=loggers, console=Quiet())


def assert_each_alone(tmp_path: Path, raw: dict, specs: dict, result) -> None:
    """Each adapter of ``result`` equals a one-adapter run of its own sections."""
    for name, spec in specs.items():
        alone = {
            **raw,
            "data": {**raw["data"], **spec["data"]},
            "lora": {**raw["lora"], **spec["lora"]},
        }
        alone["evaluation"] = {**raw["evaluation"], **spec.get("evaluation", {})}
        alone["output"] = {**raw["output"], "dir": str(tmp_path / name)}
        single = run(build(alone))
        got = result.adapters[name]
        assert got.kept_step == single.kept_step
        for step, loss in single.losses.items():
            # padded to the widest row of all the adapters: sums in another order (1.5e-5
            # apart seen on AVX2 kernels)
            assert got.losses[step] == pytest.approx(loss, rel=1e-4)
        assert got.after.loss == pytest.approx(single.after.loss, rel=1e-4)
        assert_same(tmp_path / "many" / "adapters" / name, tmp_path / name)


def test_with_adamw_clipping_and_keep_best_each_adapter_equals_its_run_alone(tmp_path):
    adapters = {n: {"lora": LORAS[n]} for n in NAMES}
    adapters["acme"]["evaluation"] = {"every": 1}  # its best step is kept, as alone
    raw, specs = in_code(tmp_path, adapters, "many", training={"steps": 6})
    # held-out answers that contradict acme's training rows: its held-out loss grows as it
    # learns, so keep-best must keep an early step (whatever the kernels' rounding)
    contrary = [{**row, "completion": "zq"} for row in rows("acme", 4)]
    write_jsonl(Path(specs["acme"]["data"]["eval"]), contrary)
    result = run(build({**raw, "adapters": specs}))
    assert_each_alone(tmp_path, raw, specs, result)
    assert result.adapters["acme"].kept_step < 6  # keep-best took an earlier step


def test_saved_heads_train_each_with_its_own_rows_and_equal_their_runs_alone(tmp_path):
    """A saved lm_head per adapter (one adapter without): the loss's head sees the kept tokens of
    every row flattened, and each token still reaches its own row's copy."""
    adapters = {n: {"lora": LORAS[n]} for n in NAMES}
    for name in ("acme", "initech"):
        adapters[name]["lora"] = {**LORAS[name], "modules_to_save": ["lm_head"]}
    raw, specs = in_code(tmp_path, adapters, "many", training={"optimizer": "adamw"})
    result = run(build({**raw, "adapters": specs}))
    assert_each_alone(tmp_path, raw, specs, result)
    saved = load_file(str(tmp_path / "many/adapters/acme/adapter/adapter_model.safetensors"))
    assert any("lm_head" in key for key in saved)


def test_qlora_adapters_share_one_4_bit_base_and_each_equals_its_run_alone(tmp_path):
    adapters = {n: {"lora": LORAS[n]} for n in NAMES[:2]}
    raw, specs = in_code(tmp_path, adapters, "many", training={"steps": 2, "method": "qlora"})
    assert_each_alone(tmp_path, raw, specs, run(build({**raw, "adapters": specs})))


def test_a_stopped_run_resumes_to_the_uninterrupted_one(tmp_path):
    adapters = {n: {"lora": LORAS[n]} for n in NAMES}
    adapters["globex"]["evaluation"] = {"every": 2}
    checkpoints = {"steps": 6, "checkpoint_every": 2, "optimizer": "adamw"}
    raw, specs = in_code(tmp_path, adapters, "whole", training=checkpoints)
    whole = run(build({**raw, "adapters": specs}))
    raw["output"]["dir"] = str(tmp_path / "stopped")
    cfg = build({**raw, "adapters": specs})
    with pytest.raises(Crash):
        run(cfg, loggers=[CrashAt(5)])  # after the checkpoint at step 4
    shutil.rmtree(tmp_path / "stopped" / "checkpoint-000004")  # back to step 2
    again = run(build({**raw, "training": {**raw["training"], "resume": True}, "adapters": specs}))
    assert again.start_step == 2
    for name in NAMES:
        assert again.adapters[name].losses == {
            s: whole.adapters[name].losses[s] for s in range(3, 7)
        }  # exactly: the same process, the same order
        for key, value in load_file(
            str(tmp_path / "whole" / "adapters" / name / "adapter" / "adapter_model.safetensors")
        ).items():
            path = (
                tmp_path / "stopped" / "adapters" / name / "adapter" / "adapter_model.safetensors"
            )
            torch.testing.assert_close(load_file(str(path))[key], value, rtol=0, atol=0)
        assert losses(tmp_path / "stopped" / "adapters" / name / "metrics.jsonl") == losses(
            tmp_path / "whole" / "adapters" / name / "metrics.jsonl"
        )


def test_resume_refuses_a_changed_adapter(tmp_path):
    adapters = {n: {"lora": LORAS[n]} for n in NAMES[:2]}
    raw, specs = in_code(tmp_path, adapters, "run", training={"checkpoint_every": 2})
    with pytest.raises(Crash):
        run(build({**raw, "adapters": specs}), loggers=[CrashAt(3)])
    specs["globex"]["lora"] = {**specs["globex"]["lora"], "r": 3}
    changed = build({**raw, "training": {**raw["training"], "resume": True}, "adapters": specs})
    with pytest.raises(lorakit.train.TrainingError, match=r"adapters.globex.lora.r: 2 -> 3"):
        run(changed)


# -- config errors --------------------------------------------------------------------------------


def test_config_problems_are_named_by_adapter_section_and_key(tmp_path):
    good = write_jsonl(tmp_path / "t.jsonl", rows("x", 3))
    (tmp_path / "run.yaml").write_text(
        "data: {train: t.jsonl, max_length: 32}\n"
        "training: {early_stopping: 2}\n"
        "adapters:\n"
        "  acme: {data: {train: nope.jsonl, colour: red}, lora: {rank: 2}, extra: 1}\n"
        "  a.b: {data: {train: t.jsonl}}\n"
        "  Acme: {data: {eval: t.jsonl}, evaluation: {every: -1}}\n"
        "  bias: {data: {train: t.jsonl}, lora: {r: 0}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml")
    said = str(e.value)
    for expected in [
        "unknown key adapters.acme.extra; valid keys: data, lora, evaluation",
        "unknown key adapters.acme.data.colour; valid keys: train, eval",
        "unknown key adapters.acme.lora.rank; valid keys: r, alpha",
        "adapters.a.b: adapter name 'a.b' is not allowed",
        "adapters.Acme: differs from adapters.acme only in case",
        "adapters.Acme.evaluation.every=-1: must not be negative",
        "adapters.bias.lora: invalid LoraConfig: r=0",
    ]:
        assert expected in said, said
    # the checks that need a well-formed config come once it is
    (tmp_path / "run.yaml").write_text(
        "data: {train: t.jsonl}\ntraining: {early_stopping: 2}\n"
        "lora: {bias: all, modules_to_save: [lm_head]}\n"
        "adapters:\n  acme: {data: {train: nope.jsonl}}\n  b: {data: {eval: t.jsonl},"
        " evaluation: {every: 2}}\n  c: {data: {train: t.jsonl}, evaluation: {every: 2}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml")
    said = str(e.value)
    for expected in [
        "data.train: with adapters, each adapter names its own file (adapters.NAME.data.train)",
        "training.early_stopping is not supported with adapters",
        "adapters.acme.data.train=",
        "nope.jsonl': no such file",
        "adapters.b.data.train: the adapter's training JSONL file is required",
        "adapters.c.evaluation.every is set but the adapter has no data.eval",
        "adapters.acme.lora.bias='all': a bias is shared by every adapter",
    ]:
        assert expected in said, said
    (tmp_path / "twice.yaml").write_text(
        f"adapters:\n  a: {{data: {{train: {good}}}}}\n  a: {{data: {{train: {good}}}}}\n"
    )
    with pytest.raises(ConfigError, match="adapters named twice: a"):
        load_config(tmp_path / "twice.yaml")


def test_overrides_reach_an_adapter_and_the_config_round_trips(tmp_path):
    good = write_jsonl(tmp_path / "t.jsonl", rows("x", 3))
    (tmp_path / "run.yaml").write_text(
        "lora: {r: 4}\nadapters:\n  a: {data: {train: t.jsonl}}\n  b: {data: {train: t.jsonl}}\n"
    )
    cfg = load_config(
        tmp_path / "run.yaml", ["adapters.b.lora.r=2", "adapters.a.data.max_length=9"]
    )
    a, b = cfg.adapters
    assert (a.lora.r, b.lora.r, a.data.max_length, b.data.max_length) == (4, 2, 9, 512)
    assert a.data.train == good  # relative to the config file
    assert build(cfg.to_dict()) == cfg
    assert yaml.safe_load(cfg.to_yaml())["adapters"]["b"]["lora"]["r"] == 2
    assert cfg.alone(b).lora.r == 2 and cfg.alone(b).adapters == ()


def test_the_cli_refuses_a_bad_adapter_before_loading_a_model(tmp_path):
    (tmp_path / "run.yaml").write_text("adapters:\n  a: {data: {}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(tmp_path / "run.yaml")],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 2
    assert "adapters.a.data.train: the adapter's training JSONL file is required" in done.stderr
