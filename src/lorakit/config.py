"""``LoraConfig``: what to adapt and how, as a small frozen, validated dataclass.

The library never mutates a config; lists and dicts handed in are copied into tuples and read-only
mappings. Every wrong value is reported at construction, all problems at once, each naming the
field, the value and what is allowed. ``to_peft_dict`` / ``from_peft_dict`` translate to and
from the keys of PEFT's ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .errors import ConfigError, gather
from .patterns import MAX_LENGTH, pattern_problem

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")
#: initialisations that change the base weights (the residual becomes the frozen base)
BASE_CHANGING_INITS = ("pissa", "olora", "loftq")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
ALL_LINEAR = "all-linear"

# PEFT keys that describe where or how an adapter is stored, not what it computes: read and ignored.
_PEFT_BOOKKEEPING = frozenset(
    {
        "peft_type",
        "task_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "fan_in_fan_out",
        "megatron_config",
        "megatron_core",
        "runtime_config",
        "layers_pattern",
        "qalora_group_size",
        "ensure_weight_tying",
    }
)
# PEFT features lorakit does not implement: an error when switched on, fine when off.
_PEFT_UNSUPPORTED_WHEN_SET = {
    "use_qalora": "QA-LoRA",
    "lora_bias": "a trainable bias on lora_B",
    "trainable_token_indices": "trainable token indices",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA initialisation",
    "lora_ga_config": "LoRA-GA initialisation",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "targeting bare parameters",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


def _frozen_map(value: Any) -> Mapping:
    return MappingProxyType(dict(value))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """How to add LoRA adapters to a model.

    ``h = W x + s · B A x`` with ``A`` (r × in), ``B`` (out × r), ``s = alpha / r`` (or
    ``alpha / sqrt(r)`` with ``use_rslora``; Kalajdzievski 2023). LoRA paper (Hu et al. 2021),
    section 4.1.

    Fields:
        r: rank of every adapter unless ``rank_pattern`` says otherwise (> 0).
        alpha: scaling numerator (> 0); the update is scaled by ``alpha / r``.
        dropout: dropout probability on the LoRA branch input, in [0, 1).
        target_modules: which modules to adapt. A list of names matches a module whose path equals
            the name or ends with ``"." + name``; a single string is a regular expression that must
            match the whole module path; ``"all-linear"`` adapts every linear layer except the
            output head.
        exclude_modules: modules never adapted, with the same matching rules.
        bias: ``"none"`` (biases frozen), ``"all"`` (every bias trains), ``"lora_only"`` (biases
            of adapted modules train).
        init: how the adapter starts. ``"kaiming"`` (kaiming-uniform A, a=sqrt(5)) or
            ``"gaussian"`` (normal A, std 1/r), B zero: the adapted model starts as the base.
            ``"pissa"`` (A, B from the top-r singular vectors of W, the residual becomes the
            frozen base; Meng et al. 2024), ``"pissa_niter_K"`` (the same by a randomised SVD of
            K subspace iterations), ``"olora"`` (from a QR decomposition of W; Büyükakyüz 2024),
            ``"loftq"`` (on a quantized base: the quantized residual plus the adapter
            approximate W; Li et al. 2023): these change the base weights, and saving converts
            the adapter back to plain LoRA on the untouched base.
        loftq_iter: alternations of quantizing and SVD for ``init="loftq"`` (>= 1).
        use_dora: DoRA (Liu et al. 2024): ``W' = m · (W + s B A) / ||W + s B A||`` per output,
            with a trained magnitude ``m`` per output.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern / alpha_pattern: per-module overrides, ``{regex: value}``; a key matches a
            module whose path fully matches it or ends with ``"." + key``; the first key wins.
        layers: adapt only modules whose layer index (the first integer in the module path) is
            listed.
        modules_to_save: modules (e.g. a classifier head) trained fully beside the adapters.
        fused_slices: ``{name: (True, False, True)}`` adapts a fused projection slice by slice:
            its output is split into equal parts and only the ``True`` parts get an adapter (GPT-2's
            ``c_attn`` on q and v, as in the LoRA paper's GPT-2 experiments).

    A keyword that is not a field is an ``UnknownFieldError`` (a ``ConfigError`` and a
    ``TypeError``); PEFT's names (``lora_alpha``, ``lora_dropout``, ``init_lora_weights``,
    ``layers_to_transform``) are answered with lorakit's field. ``apply_lora`` also takes a
    ``peft.LoraConfig`` object.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    exclude_modules: str | tuple[str, ...] | None = None
    bias: str = "none"
    init: str = "kaiming"
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    fused_slices: Mapping[str, tuple[bool, ...]] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        set_ = object.__setattr__  # the instance is frozen; normalise copies of what was given

        def check_rank(field: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{field}={value!r}: expected a positive integer")

        def check_alpha(field: str, value: Any) -> None:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not value > 0 or value != value or value == float("inf"):
                problems.append(f"{field}={value!r}: expected a positive finite number")

        check_rank("r", self.r)
        check_alpha("alpha", self.alpha)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            problems.append(f"dropout={self.dropout!r}: expected a number in [0, 1)")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias={self.bias!r}: expected one of {', '.join(BIAS_MODES)}")
        if self.init not in INIT_MODES or self.init == "pissa_niter_K":
            if not (isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init)):
                problems.append(
                    f"init={self.init!r}: expected one of {', '.join(INIT_MODES)} "
                    "(K a positive integer, e.g. pissa_niter_16)"
                )
        for field in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field}={getattr(self, field)!r}: expected True or False")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int):
            problems.append(f"loftq_iter={self.loftq_iter!r}: expected a positive integer")
        elif self.loftq_iter < 1:
            problems.append(f"loftq_iter={self.loftq_iter!r}: expected a positive integer")

        set_(self, "target_modules", _names("target_modules", self.target_modules, problems))
        if self.target_modules is None:
            problems.append(
                "target_modules=None: expected 'all-linear', a regex or a list of names"
            )
        if self.exclude_modules is not None:
            set_(self, "exclude_modules", _names("exclude_modules", self.exclude_modules, problems))
        if self.modules_to_save is not None:
            value = _names("modules_to_save", self.modules_to_save, problems)
            if isinstance(value, str):
                value = (value,)
            set_(self, "modules_to_save", value)

        for field, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
            mapping = getattr(self, field)
            if not isinstance(mapping, Mapping):
                problems.append(f"{field}={mapping!r}: expected a mapping {{pattern: value}}")
                set_(self, field, _frozen_map({}))
                continue
            for key, value in mapping.items():
                _check_regex(f"{field} key", key, problems)
                check(f"{field}[{key!r}]", value)
            set_(self, field, _frozen_map(mapping))

        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else self.layers
            try:
                layers = tuple(layers)
            except TypeError:
                layers = ()
                problems.append(f"layers={self.layers!r}: expected an int or a list of ints")
            for item in layers:
                if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                    problems.append(f"layers item {item!r}: expected a non-negative integer")
            set_(self, "layers", layers)

        slices = self.fused_slices
        if not isinstance(slices, Mapping):
            problems.append(f"fused_slices={slices!r}: expected {{name: (True, False, ...)}}")
            slices = {}
        frozen = {}
        for key, value in slices.items():
            flags = tuple(value) if isinstance(value, Sequence) else ()
            if len(flags) < 2 or not all(isinstance(f, bool) for f in flags) or not any(flags):
                problems.append(
                    f"fused_slices[{key!r}]={value!r}: expected two or more booleans, "
                    "at least one True"
                )
            frozen[key] = flags
        set_(self, "fused_slices", _frozen_map(frozen))
        gather(problems, ConfigError, "invalid LoraConfig")

    # A config is immutable: copies may share it; pickling rebuilds (and re-validates) it.
    def __copy__(self) -> LoraConfig:
        return self

    def __deepcopy__(self, memo: dict) -> LoraConfig:
        return self

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __reduce__(self):
        return (_rebuild, (self.to_dict(),))

    # ----------------------------------------------------------------------------------------------
    def scaling(self, r: int, alpha: float) -> float:
        """The factor ``s`` the update ``B A x`` is multiplied by, for a given rank and alpha."""
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    @property
    def changes_base(self) -> bool:
        """Whether the initialisation rewrites the base weights (PiSSA, OLoRA, LoftQ)."""
        return self.init.startswith(BASE_CHANGING_INITS)

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields, in lorakit's own names."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build from lorakit's own field names; an unknown key is an error listing valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown LoraConfig key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(valid)}"
            )
        return cls(**data)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter-describing keys of PEFT's ``adapter_config.json``."""
        if self.fused_slices:
            raise ConfigError(
                "fused_slices has no equivalent in PEFT's format; save this adapter in "
                "lorakit's own format or merge it"
            )
        targets = self.target_modules
        if isinstance(targets, str) and self.layers is not None:
            raise ConfigError(
                f"layers={list(self.layers)} with target_modules={targets!r} cannot be written for "
                "PEFT (it refuses layers_to_transform with a string target); list the module "
                "names, or put the layer index in a regex"
            )
        return {
            "peft_type": "LORA",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "exclude_modules": (
                self.exclude_modules
                if self.exclude_modules is None or isinstance(self.exclude_modules, str)
                else sorted(self.exclude_modules)
            ),
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": list(self.layers) if self.layers is not None else None,
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "use_dora": self.use_dora,
            "lora_bias": False,
            **(
                {"loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_iter}}
                if self.init == "loftq"
                else {}
            ),
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any], source: str = "adapter_config.json"):
        """Read PEFT's ``adapter_config.json`` keys.

        Keys lorakit does not know give a warning (newer PEFT versions add keys); PEFT features that
        lorakit does not implement are an error when switched on, never silently dropped.
        """
        data = dict(data)
        problems: list[str] = []
        if data.get("peft_type", "LORA") not in ("LORA", None):
            problems.append(f"peft_type={data['peft_type']!r}: only 'LORA' adapters are supported")
        for key, feature in _PEFT_UNSUPPORTED_WHEN_SET.items():
            if data.get(key) not in (None, False, {}, [], 16 if key == "qalora_group_size" else ()):
                problems.append(f"{key}={data[key]!r}: {feature} is not supported by lorakit")
        init = data.get("init_lora_weights", True)
        init_map = {True: "kaiming", "gaussian": "gaussian", False: "kaiming"}
        init_map |= {name: name for name in ("pissa", "olora", "loftq")}
        if isinstance(init, str) and _PISSA_NITER.fullmatch(init):
            init_map[init] = init
        if init not in init_map:
            problems.append(
                f"init_lora_weights={init!r}: lorakit reads True, False, 'gaussian', 'pissa', "
                "'pissa_niter_K', 'olora' or 'loftq' (other initialisations are not supported)"
            )
        loftq = data.get("loftq_config") or {}
        if not isinstance(loftq, Mapping):
            problems.append(f"loftq_config={loftq!r}: expected a mapping")
            loftq = {}
        elif loftq.get("loftq_bits", 4) != 4:
            problems.append(
                f"loftq_config.loftq_bits={loftq['loftq_bits']!r}: lorakit's LoftQ uses 4 bits"
            )
        gather(problems, ConfigError, f"{source}: unsupported PEFT adapter")
        mapped = {
            "r": data.get("r", 8),
            "alpha": data.get("lora_alpha", 8),
            "dropout": data.get("lora_dropout", 0.0),
            "target_modules": data.get("target_modules"),
            "exclude_modules": data.get("exclude_modules"),
            "bias": data.get("bias", "none"),
            "init": init_map.get(init, "kaiming"),
            "use_rslora": data.get("use_rslora", False),
            "rank_pattern": data.get("rank_pattern") or {},
            "alpha_pattern": data.get("alpha_pattern") or {},
            "layers": data.get("layers_to_transform"),
            "modules_to_save": data.get("modules_to_save"),
            "use_dora": data.get("use_dora", False) or False,
            "loftq_iter": loftq.get("loftq_iter", 1),
        }
        known = (
            set(_PEFT_BOOKKEEPING)
            | set(_PEFT_UNSUPPORTED_WHEN_SET)
            | {
                "r",
                "lora_alpha",
                "lora_dropout",
                "target_modules",
                "exclude_modules",
                "bias",
                "init_lora_weights",
                "use_rslora",
                "rank_pattern",
                "alpha_pattern",
                "layers_to_transform",
                "modules_to_save",
                "use_dora",
                "loftq_config",
            }
        )
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{source}: ignoring key(s) lorakit does not know: {', '.join(unknown)}",
                stacklevel=2,
            )
        try:
            return cls(**mapped)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


class UnknownFieldError(ConfigError, TypeError):
    """``LoraConfig`` was given a keyword it has no field for (a ``TypeError``, as Python raises
    for any unexpected keyword, and a ``ConfigError``)."""


# PEFT's names for lorakit's fields: given to LoraConfig, the error names lorakit's field.
PEFT_FIELD_NAMES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "init_lora_weights": "init",
    "layers_to_transform": "layers",
}
_FIELDS = tuple(f.name for f in dataclasses.fields(LoraConfig))
_dataclass_init = LoraConfig.__init__


@functools.wraps(_dataclass_init)
def _checked_init(self, *args: Any, **kwargs: Any) -> None:
    unknown = [key for key in kwargs if key not in _FIELDS]
    if unknown:
        named = []
        for key in unknown:
            if key in PEFT_FIELD_NAMES:
                named.append(
                    f"{key!r} is PEFT's name: lorakit's field is {PEFT_FIELD_NAMES[key]!r}"
                )
            elif key in _PEFT_BOOKKEEPING or key in _PEFT_UNSUPPORTED_WHEN_SET:
                named.append(
                    f"{key!r} is a PEFT field lorakit has no equivalent for (apply_lora also "
                    "takes a peft.LoraConfig, and converts what it can)"
                )
            else:
                named.append(f"{key!r} is not a field")
        raise UnknownFieldError(f"LoraConfig: {'; '.join(named)}. Fields: {', '.join(_FIELDS)}")
    _dataclass_init(self, *args, **kwargs)


LoraConfig.__init__ = _checked_init  # the dataclass's __init__, with the unknown keywords named


def _rebuild(fields: dict[str, Any]) -> LoraConfig:
    return LoraConfig(**fields)


def _names(field: str, value: Any, problems: list[str]) -> str | tuple[str, ...] | None:
    """Normalise a target spec: a regex string stays a string, any other iterable a sorted tuple."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _check_regex(field, value, problems)
        return value
    if isinstance(value, (Sequence, set, frozenset)):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad or not items:
            problems.append(f"{field}={value!r}: expected a non-empty list of module names")
            return tuple(v for v in items if isinstance(v, str))
        return tuple(sorted(set(items)))
    problems.append(f"{field}={value!r}: expected a string or a list of module names")
    return None


def _check_regex(field: str, pattern: Any, problems: list[str]) -> None:
    if not isinstance(pattern, str) or not pattern:
        problems.append(f"{field} {pattern!r}: expected a non-empty string")
        return
    if len(pattern) > MAX_LENGTH:  # before compiling: the compiler is not linear either
        problems.append(f"{field} {pattern[:60]!r}... {pattern_problem(pattern)}")
        return
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        problems.append(f"{field} {pattern!r} is not a valid regular expression: {exc}")
        return
    problem = pattern_problem(pattern)
    if problem:
        problems.append(f"{field} {pattern!r} {problem}")
