"""PEFT's on-disk names and config for lorakit's adapters, both ways.

PEFT saves an adapter of a model wrapped as ``PeftModel`` (every key starts ``base_model.model.``)
with the adapter name taken out of every key:

=====================================  ===========================================================
``<path>.lora_A.weight``               A, (r, in); a convolution's (r, in, *kernel)
``<path>.lora_B.weight``               B, (out, r); a convolution's (out, r, 1, ...)
``<path>.lora_embedding_A``            an embedding's A, (r, num_embeddings); no ``.weight``
``<path>.lora_embedding_B``            an embedding's B, (dim, r)
``<path>.lora_magnitude_vector``       a DoRA adapter's magnitude, (out,); no ``.weight``
``<path>.<name>``                      a ``modules_to_save`` copy's tensors (``classifier.weight``:
                                       PEFT drops the ``modules_to_save.<adapter>.`` part)
``<path>.base_layer.bias``             a targeted layer's bias (``bias="all"`` or ``"lora_only"``)
``<path>.bias``                        any other bias (``bias="all"``)
=====================================  ===========================================================

GPT-2's ``Conv1D`` stores its weight transposed, but its A and B are laid out as for a linear
layer; ``adapter_config.json`` then says ``fan_in_fan_out: true``. PEFT may also write base
weights beside an adapter (``<path>.base_layer.weight`` of a targeted embedding, the input and
output embeddings after a vocabulary resize, ``<path>.original_module.*`` with ``bias="all"``):
lorakit reads those as optional base tensors.

Fused-slice adapters (lorakit only) are written as the plain LoRA they equal: the adapted slices'
A stacked, (m·r, in), B expanded to its block form, (out, m·r), at rank m·r with alpha scaled so
the scale is unchanged. PEFT loads that file and computes the same outputs; lorakit reads the
compact slice form back from the config it stores in the metadata (``lorakit.config``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import AdapterError, AdapterFileError
from ..layers import LoraLayer, SavedModule
from ..targeting import pattern_match, suffix_match

PREFIX = "base_model.model."
ROLES = ("lora_A", "lora_B", "lora_magnitude", "saved", "bias", "base")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One tensor of an adapter file and the model tensor it belongs to."""

    key: str  # the key in the file
    module: str  # the module path, for messages
    role: str  # one of ROLES
    target: torch.Tensor  # the model's parameter or buffer
    shape: tuple[int, ...]  # the shape in the file
    layer: LoraLayer | None = None  # set for a fused-slice B, whose file layout differs

    def pack(self, adapter_name: str) -> torch.Tensor:
        """The tensor to write."""
        if self.layer is not None:
            return self.layer.effective_B(adapter_name).detach()
        return self.target.detach()

    def unpack(self, tensor: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The file's tensor in the model's layout (a fused B back to its compact slices)."""
        if self.layer is None:
            return tensor
        try:
            return self.layer.compact_B(tensor, self.layer.record(adapter_name).rank)
        except AdapterError as exc:
            raise AdapterFileError(f"{self.key}: {exc}") from None


def _key(path: str, rest: str) -> str:
    return f"{PREFIX}{path}.{rest}" if path else f"{PREFIX}{rest}"


def _wrappers(model: nn.Module) -> dict[str, nn.Module]:
    # every path of a shared module: its state-dict keys appear under each
    modules = model.named_modules(remove_duplicate=False)
    return {p: m for p, m in modules if isinstance(m, (LoraLayer, SavedModule))}


def _owner(key: str, wrappers: dict[str, nn.Module]) -> str | None:
    if "" in wrappers:
        return ""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in wrappers:
            return path
    return None


def slots(
    model: nn.Module, adapter_name: str, bias: str = "none", optional: bool = True
) -> tuple[dict, dict]:
    """(required, optional) slots of adapter ``adapter_name``, each ``{file key: Slot}``.

    Required: the adapter's A and B, its ``modules_to_save`` copies and the biases its bias mode
    trains. Optional: every other base tensor under the name PEFT would give it; with
    ``optional=False`` (saving) only what the required slots need is walked.
    """
    wrappers = _wrappers(model)
    required: dict[str, Slot] = {}
    others: dict[str, Slot] = {}
    for owner, key, tensor in _entries(model, wrappers, whole=optional or bias == "all"):
        if owner is None:
            role = "bias" if bias == "all" and key.rsplit(".", 1)[-1] == "bias" else "base"
            module = key.rpartition(".")[0]
            slot = Slot(PREFIX + key, module, role, tensor, tuple(tensor.shape))
            (required if role == "bias" else others)[slot.key] = slot
            continue
        wrapper = wrappers[owner]
        rest = key[len(owner) + 1 :] if owner else key
        if isinstance(wrapper, LoraLayer):
            _layer_slot(wrapper, owner, rest, tensor, adapter_name, bias, required, others)
        else:
            _saved_slot(owner, rest, tensor, adapter_name, required, others)
    return required, others


def _entries(model: nn.Module, wrappers: dict[str, nn.Module], whole: bool):
    """(owner path or None, state-dict key, tensor): the whole model's, or only the wrappers'."""
    if whole:
        for key, tensor in model.state_dict(keep_vars=True).items():
            yield _owner(key, wrappers), key, tensor
        return
    for path, wrapper in wrappers.items():
        for rest, tensor in wrapper.state_dict(keep_vars=True).items():
            yield path, f"{path}.{rest}" if path else rest, tensor


def _layer_slot(layer, path, rest, tensor, adapter_name, bias, required, optional) -> None:
    head, _, name = rest.partition(".")
    if head in ("lora_A", "lora_B"):
        if name != adapter_name:
            return  # another adapter's tensor
        letter = head[-1]
        key = _key(path, layer.peft_keys[0 if letter == "A" else 1])
        shape = tuple(tensor.shape)
        fused = None
        if letter == "B" and layer.expands_B:
            fused = layer
            shape = (layer.out_features, layer.record(name).rank * sum(layer.slices))
        required[key] = Slot(key, path, head, tensor, shape, fused)
        return
    if head == "lora_magnitude":
        if name == adapter_name:
            key = _key(path, "lora_magnitude_vector")
            required[key] = Slot(key, path, head, tensor, tuple(tensor.shape))
        return
    key = _key(path, f"base_layer.{rest}")
    trained = rest == "bias" and (
        bias == "all" or (bias == "lora_only" and adapter_name in layer.lora_A)
    )
    slot = Slot(key, path, "bias" if trained else "base", tensor, tuple(tensor.shape))
    (required if trained else optional)[key] = slot


def _saved_slot(path, rest, tensor, adapter_name, required, optional) -> None:
    head, _, tail = rest.partition(".")
    if head == "original_module":
        optional[_key(path, rest)] = Slot(
            _key(path, rest), path, "base", tensor, tuple(tensor.shape)
        )
        return
    name, _, param = tail.partition(".")  # head == "modules_to_save"
    if name != adapter_name:
        return
    slot = Slot(_key(path, param), path, "saved", tensor, tuple(tensor.shape))
    required[slot.key] = slot
    # PEFT's bias="all" also writes the copy's bias as <path>.modules_to_save.bias
    alias = _key(path, f"modules_to_save.{param}")
    optional[alias] = dataclasses.replace(slot, key=alias)


# -- adapter_config.json ----------------------------------------------------------------------
_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)
# Modules PEFT adds to modules_to_save by itself for a task type; a file may name them although the
# model has none of them (PEFT skips a name that matches nothing).
TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (None for other models)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


def base_name(model: nn.Module) -> str | None:
    """``base_model_name_or_path``: the model's ``name_or_path``, as PEFT writes it, made a name
    others can resolve (``lorakit.models.public_name``: the embedded model's hub id, never a path
    in a cache); None for a model built in code."""
    from ..models import public_name

    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return public_name(name) if name else None


def _lookup(patterns, path: str, default):
    return next((v for k, v in patterns.items() if pattern_match(path, k)), default)


def peft_config_dict(
    model: nn.Module, adapter_name: str, config: LoraConfig, layers: list[tuple[str, LoraLayer]]
) -> dict[str, Any]:
    """``adapter_config.json`` for an adapter, its per-module ranks and alphas as PEFT will read
    them: a layer whose rank or alpha in the file differs from what the config's patterns give
    (fused slices, adapters built by ``combine``) gets its own exact-path pattern entry."""
    data = (config.replace(fused_slices={}) if config.fused_slices else config).to_peft_dict()
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, layer in layers:
        record = layer.record(adapter_name)
        r, alpha = record.rank, record.alpha
        if not math.isclose(config.scaling(r, alpha), record.scale, rel_tol=1e-12):
            raise AdapterFileError(
                f"{path}: adapter {adapter_name!r} has scale {record.scale}, which "
                f"r={r}, alpha={alpha} do not give; it cannot be written in PEFT's format"
            )
        r_file = layer.lora_A[adapter_name].shape[0]
        m = r_file // r
        alpha_file = alpha * (math.sqrt(m) if config.use_rslora else m) if m > 1 else alpha
        key = re.escape(path)
        if r_file != _lookup(config.rank_pattern, path, config.r):
            ranks[key] = r_file
        if alpha_file != _lookup(config.alpha_pattern, path, config.alpha):
            alphas[key] = alpha_file
    # exact-path entries first: the first matching key wins, in PEFT as in lorakit
    data["rank_pattern"] = {**ranks, **data["rank_pattern"]}
    data["alpha_pattern"] = {**alphas, **data["alpha_pattern"]}
    task = task_type(model)
    if task in TASK_MODULES:
        # PEFT's wrapper for this task saves the task's head modules itself and fails to load a
        # file without them: name the task only when the adapter saves the heads the model has.
        paths = [p for p, _ in model.named_modules() if p]
        saved = config.modules_to_save or ()
        heads = [h for h in TASK_MODULES[task] if any(suffix_match(p, h) for p in paths)]
        if any(h not in saved for h in heads):
            task = None
    data.update(
        task_type=task,
        base_model_name_or_path=base_name(model),
        inference_mode=True,
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),
        revision=None,
        layers_pattern=None,
    )
    return dict(sorted(data.items()))
