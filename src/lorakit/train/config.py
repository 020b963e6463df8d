"""The training config: one YAML file in six sections, with dotted ``key=value`` overrides.

```yaml
model:      {source: null, dtype: float32}          # null: the embedded SmolLM2-135M-Instruct
data:       {train: train.jsonl, eval: held_out.jsonl, max_length: 512}
lora:       {r: 16, alpha: 32, target_modules: all-linear}   # the LoraConfig fields
training:   {method: lora, steps: 150, batch_size: 8, lr: 2.0e-3}   # lr, epochs: auto if not given
evaluation: {max_new_tokens: 16}
output:     {dir: runs/demo}
```

Only ``data.train`` is required; the defaults are chosen to learn a small task in one run.

Many adapters in one run: an optional seventh section, ``adapters:``, names each adapter with its
own ``data`` (``train`` required), ``lora`` and ``evaluation`` overrides of the top-level sections
(see :mod:`lorakit.train.multi_config` and :mod:`lorakit.train.multi`).

Everything is checked here, before any weight is loaded: an unknown section or key is an error
listing the valid ones, a value of the wrong type or out of range names its dotted key, and every
problem is gathered and raised once as a :class:`~lorakit.ConfigError`. The config is frozen and
never changed by the library.

Paths: data files written in the YAML file are relative to the file's own directory (a config
travels with its data); paths given on the command line, and ``output.dir``, are relative to the
working directory.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import LoraConfig
from ..errors import ConfigError, gather


@dataclass(frozen=True)
class ModelSection:
    """source: a transformers directory, a ``.gguf`` file, or null for the embedded default.
    device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``auto`` (a GPU when there is one)."""

    source: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


@dataclass(frozen=True)
class DataSection:
    """JSONL files (see :mod:`lorakit.train.data`), truncation length, packing and templating."""

    train: str | None = None
    eval: str | None = None
    max_length: int = 512
    packing: bool = False
    chat_template: bool = True
    system_prompt: str | None = None


@dataclass(frozen=True)
class TrainingSection:
    """The optimisation. ``steps`` are optimizer steps of ``batch_size * grad_accum`` rows; when it
    is null, ``epochs`` passes over the training rows decide it. ``lr`` and ``epochs`` are ``auto``
    unless given: see :func:`auto_lr` and :func:`auto_epochs` (computed once the model is loaded
    and the rows are read)."""

    method: Literal["lora", "qlora", "full"] = "lora"
    steps: int | None = None
    epochs: float | Literal["auto"] = "auto"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | Literal["auto"] = "auto"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: plain SGD (no momentum)
    loraplus_lr_ratio: float | None = None  # LoRA+: B's lr = this x lr (param_groups.py)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the lr of an adapted embedding's A and B
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    resume: bool = False
    early_stopping: int = 0  # stop after this many held-out evaluations without a better loss
    distributed: Literal["auto", "ddp", "fsdp", "none"] = "auto"  # under torchrun; auto: ddp
    distributed_timeout: float = 600.0  # seconds a rank waits for the others before failing


@dataclass(frozen=True)
class EvaluationSection:
    """Held-out loss every ``every`` steps (0: only before and after training) and exact match by
    greedy generation before and after."""

    every: int = 0
    before: bool = True
    exact_match: bool = True
    max_rows: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    samples: int = 5


@dataclass(frozen=True)
class OutputSection:
    """Where the adapter, checkpoints, ``metrics.jsonl``, the plot and ``report.md`` go.
    ``keep_best``: with held-out evaluations during training (``evaluation.every``), the saved
    adapter is the one with the lowest held-out loss, not the last step's."""

    dir: str = "runs/lorakit"
    keep_checkpoints: int = 2
    overwrite: bool = False
    plot: bool = True
    report: bool = True
    keep_best: bool = True


@dataclass(frozen=True)
class AdapterSection:
    """One adapter of a many-adapter run: its name and its ``data``, ``lora`` and ``evaluation``
    sections, each the top-level section with this adapter's overrides applied (resolved)."""

    name: str
    data: DataSection
    lora: LoraConfig
    evaluation: EvaluationSection

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "data": dataclasses.asdict(self.data),
            "lora": self.lora.to_dict(),
            "evaluation": dataclasses.asdict(self.evaluation),
        }


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    output: OutputSection = field(default_factory=OutputSection)
    #: many adapters in one run (empty: one adapter, ``data`` and ``lora`` above)
    adapters: tuple[AdapterSection, ...] = ()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in SECTION_NAMES:
            section = getattr(self, name)
            out[name] = section.to_dict() if name == "lora" else dataclasses.asdict(section)
        if self.adapters:  # resolved: every key of each adapter's sections
            out["adapters"] = {a.name: a.to_dict() for a in self.adapters}
        return out

    def alone(self, adapter: AdapterSection) -> TrainConfig:
        """The one-adapter config that trains ``adapter`` by itself with the same settings."""
        return dataclasses.replace(
            self, data=adapter.data, lora=adapter.lora, evaluation=adapter.evaluation, adapters=()
        )

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


SECTION_NAMES = ("model", "data", "lora", "training", "evaluation", "output")
SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "evaluation": EvaluationSection,
    "output": OutputSection,
}
# Checked positive (> 0) or non-negative (>= 0) after the types.
POSITIVE = set(
    "data.max_length training.batch_size training.grad_accum training.lr training.steps "
    "training.epochs training.log_every training.threads training.max_grad_norm "
    "training.distributed_timeout training.loraplus_lr_ratio training.loraplus_lr_embedding "
    "evaluation.batch_size evaluation.max_new_tokens evaluation.max_rows".split()
)
NON_NEGATIVE = set(
    "training.weight_decay training.warmup_steps training.min_lr_ratio training.checkpoint_every "
    "training.early_stopping evaluation.every evaluation.samples output.keep_checkpoints".split()
)
DATA_PATHS = ("train", "eval")


def valid_keys() -> dict[str, list[str]]:
    """Every section and its keys, in order."""
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
    keys["lora"] = [f.name for f in dataclasses.fields(LoraConfig)]
    return {name: keys[name] for name in SECTION_NAMES}


# ``auto`` values, chosen from a sweep on small tasks (BENCHMARKS.md, "Defaults that learn").
AUTO_LR = {"lora": 2e-3, "qlora": 2e-3, "full": 5e-5}  # at AUTO_LR_PARAMS base parameters
AUTO_LR_PARAMS = 135e6  # SmolLM2-135M-Instruct, the model the sweep ran on
AUTO_MIN_STEPS = 100  # epochs: auto passes over the data until at least this many steps ...
AUTO_MAX_EPOCHS = 3  # ... but never more passes than this


def auto_lr(method: str, params: int) -> float:
    """``training.lr: auto``: the method's rate at 135M parameters (2e-3 for LoRA and QLoRA, 5e-5
    for a full fine-tune), times ``sqrt(135M / params)`` for larger bases (a 7B base gets 2.8e-4
    with LoRA, close to the usual 2e-4), never more for smaller ones."""
    return AUTO_LR[method] * min(1.0, (AUTO_LR_PARAMS / max(params, 1)) ** 0.5)


#: ``training.lr: auto`` for adapters whose A and B start from the base weight (PiSSA, OLoRA): a
#: tenth of LoRA's. On the demo's dates, SmolLM2-135M, r=16, both diverged at LoRA's 2e-3 (loss
#: 0.86 -> 10-14 at step 2) and trained at 2e-4 (BENCHMARKS.md, section variants).
AUTO_LR_SVD_INIT = 0.1


def auto_lr_note(config: TrainConfig) -> tuple[float, str]:
    """(factor, reason): what ``training.lr: auto`` multiplies the method's rate by for the
    config's adapters, and why ("" for 1). PiSSA and OLoRA starts take a tenth; LoRA+ divides by
    its ratio, so that B's rate (``ratio x lr``) is the rate plain LoRA's B would get (at ratio 16
    and 1e-4 LoRA+ matched or beat LoRA at 2e-3 on three of the four tasks measured; at 2e-3 it
    diverged). In a run of many adapters, the smallest factor of any of them."""
    if config.training.method == "full":
        return 1.0, ""
    loras = [config.lora, *(a.lora for a in config.adapters)]
    factor, reasons = 1.0, []
    inits = sorted({lo.init for lo in loras if lo.init.startswith(("pissa", "olora"))})
    if inits:
        factor *= AUTO_LR_SVD_INIT
        reasons.append(f"lora.init {'/'.join(inits)}: a tenth of LoRA's")
    ratio = config.training.loraplus_lr_ratio
    if ratio:
        factor /= ratio
        reasons.append(f"LoRA+: divided by loraplus_lr_ratio {ratio:g}, so B's rate is LoRA's")
    return factor, "; ".join(reasons)


def auto_epochs(rows: int, rows_per_step: int) -> float:
    """``training.epochs: auto``: one pass over ``rows`` training rows, or more when one pass is
    fewer than 100 optimizer steps: as many as make 100 steps, at most 3 passes."""
    passes = AUTO_MIN_STEPS * rows_per_step / max(rows, 1)
    return float(min(AUTO_MAX_EPOCHS, max(1.0, passes)))


def resolve_auto(config: TrainConfig, params: int, rows: int) -> TrainConfig:
    """``config`` with its ``auto`` values computed for a base of ``params`` parameters and
    ``rows`` training rows (after packing); a config without ``auto`` comes back unchanged."""
    tc = config.training
    changes: dict[str, float] = {}
    if tc.lr == "auto":
        changes["lr"] = auto_lr(tc.method, params) * auto_lr_note(config)[0]
    if tc.epochs == "auto":
        changes["epochs"] = auto_epochs(rows, tc.batch_size * tc.grad_accum)
    if not changes:
        return config
    return dataclasses.replace(config, training=dataclasses.replace(tc, **changes))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The validated config from a YAML file (or defaults) and ``section.key=value`` overrides."""
    from .requirements import require

    require({"yaml": "reading the training config"})
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = _read_utf8(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        from .multi_config import adapter_data, repeated_adapters

        repeated = repeated_adapters(text)  # YAML itself keeps the last of repeated keys
        if repeated:
            raise ConfigError(f"{path}: adapters named twice: {', '.join(repeated)}")
        for data in [raw.get("data"), *adapter_data(raw)]:
            if isinstance(data, dict):  # data files written in the file are relative to the file
                for key in DATA_PATHS:
                    if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                        data[key] = str(path.parent / data[key])
    problems: list[str] = []
    for item in overrides:
        key, eq, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not name:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        target = raw.setdefault(section, {})
        if section == "adapters":  # adapters.NAME.section.key=value
            *inner, name = name.split(".")
            for part in inner:
                target = target.setdefault(part, {}) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[name] = value
    gather(problems, ConfigError, "bad command-line override")
    return build(raw, source=str(path) if path else "config")


def _read_utf8(path: Path) -> str:
    """The text of ``path``; invalid UTF-8 is a :class:`ConfigError` naming ``file:line``."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def build(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts, with every problem gathered into one error."""
    problems: list[str] = []
    keys = valid_keys()
    for section in raw:
        if section not in keys and section != "adapters":
            problems.append(
                f"unknown section {section!r}; valid sections: {', '.join(keys)}, adapters"
            )
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping of keys, got {type(values).__name__}")
            continue
        built[name] = _section(name, cls, values, problems)
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        problems.append(f"lora: expected a mapping of keys, got {type(lora).__name__}")
    else:
        unknown = sorted(set(lora) - set(keys["lora"]))
        for key in unknown:
            problems.append(f"unknown key lora.{key}; valid keys: {', '.join(keys['lora'])}")
        try:
            if not unknown:
                fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in lora.items()}
                built["lora"] = LoraConfig(**fixed)
        except ConfigError as e:
            problems.append(f"lora: {e}")
    if raw.get("adapters") is not None:
        from .multi_config import build_adapters

        built["adapters"] = build_adapters(raw, built, problems)
    if not problems:
        _cross_checks(built, problems)
    gather(problems, ConfigError, f"{source}: invalid training config")
    return TrainConfig(**built)


def _section(
    name: str, cls: type, values: dict[str, Any], problems: list[str], prefix: str = ""
) -> Any:
    """Section ``name`` built from ``values``; problems are named ``{prefix}{name}.{key}``."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kept = {}
    for key, value in values.items():
        where = f"{name}.{key}"
        if key not in hints:
            problems.append(f"unknown key {prefix}{where}; valid keys: {', '.join(fields)}")
            continue
        ok, value = _coerce(value, hints[key])
        if not ok:
            problems.append(f"{prefix}{where}={value!r}: expected {_describe(hints[key])}")
            continue
        if value is not None and not isinstance(value, (bool, str)):
            if where in POSITIVE and not value > 0:
                problems.append(f"{prefix}{where}={value!r}: must be greater than 0")
                continue
            if where in NON_NEGATIVE and not value >= 0:
                problems.append(f"{prefix}{where}={value!r}: must not be negative")
                continue
        kept[key] = value
    return cls(**kept)


def _options(hint: Any) -> tuple[Any, ...]:
    """The types a hint allows: ``float | Literal["auto"]`` is a ``typing.Union``, ``int | None`` a
    ``types.UnionType``."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return typing.get_args(hint) if union else (hint,)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value): ``value`` checked against a type hint. Numbers written as strings are read
    (YAML 1.1 reads ``2e-3`` as a string); bools are never numbers."""
    options = _options(hint)
    if value is None:
        return type(None) in options, value
    for option in options:
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return True, value
        elif option is bool:
            if isinstance(value, bool):
                return True, value
        elif option in (int, float) and not isinstance(value, bool):
            if isinstance(value, str):
                try:
                    value = float(value) if option is float else int(value)
                except ValueError:
                    continue
            if option is float and isinstance(value, int):
                value = float(value)
            if isinstance(value, option) and value == value and abs(value) != float("inf"):
                return True, value
        elif option is str and isinstance(value, str):
            return True, value
    return False, value


def _describe(hint: Any) -> str:
    options = _options(hint)
    words = []
    for option in options:
        if typing.get_origin(option) is Literal:
            values = typing.get_args(option)
            words.append(("one of " if len(values) > 1 else "") + ", ".join(map(repr, values)))
        elif option is type(None):
            words.append("null")
        else:
            names = {int: "an integer", float: "a number", bool: "true or false"}
            words.append(names.get(option, "a string"))
    return " or ".join(words)


def _cross_checks(built: dict[str, Any], problems: list[str]) -> None:
    data, training, evaluation = built["data"], built["training"], built["evaluation"]
    if built.get("adapters"):
        from .multi_config import check_many

        check_many(built, problems)  # each adapter's data and evaluation, checked there
        data = evaluation = None
    elif data.train is None:
        problems.append("data.train: the training JSONL file is required")
    _check_files(data, problems)
    device = built["model"].device
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        problems.append(f"model.device={device!r}: expected cpu, cuda, cuda:N, mps or auto")
    source = built["model"].source
    if source is not None and not Path(source).exists():
        problems.append(f"model.source={source!r}: no such file or directory")
    if training.warmup_steps and training.steps and training.warmup_steps > training.steps:
        problems.append(
            f"training.warmup_steps={training.warmup_steps} is more than "
            f"training.steps={training.steps}"
        )
    if training.min_lr_ratio > 1:
        problems.append(f"training.min_lr_ratio={training.min_lr_ratio}: must be at most 1")
    _check_loraplus(training, problems)
    if data is None:
        return
    if evaluation.every and data.eval is None:
        problems.append("evaluation.every is set but there is no data.eval file to evaluate on")
    if training.early_stopping and not (evaluation.every and data.eval is not None):
        problems.append(
            "training.early_stopping counts held-out evaluations: it needs data.eval and "
            "evaluation.every > 0"
        )


def _check_loraplus(training: TrainingSection, problems: list[str]) -> None:
    """LoRA+ needs adapters (its ratio is B's rate over A's); its embedding rate needs the ratio."""
    ratio = training.loraplus_lr_ratio
    if ratio is not None and training.method == "full":
        problems.append(
            f"training.loraplus_lr_ratio={ratio}: LoRA+ sets the rate of LoRA's B matrices; "
            "training.method=full has none (use lora or qlora, or leave the ratio null)"
        )
    default = TrainingSection.loraplus_lr_embedding
    if ratio is None and training.loraplus_lr_embedding != default:
        problems.append(
            f"training.loraplus_lr_embedding={training.loraplus_lr_embedding}: applies only "
            "with LoRA+; set training.loraplus_lr_ratio (e.g. 16) too, or leave it out"
        )


def _check_files(data: DataSection | None, problems: list[str], prefix: str = "") -> None:
    """Every data file named in ``data`` exists."""
    for key in DATA_PATHS if data is not None else ():
        value = getattr(data, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"{prefix}data.{key}={value!r}: no such file")
