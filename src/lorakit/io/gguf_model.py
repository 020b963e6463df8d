"""Merged GGUF models: the base with an adapter folded in, as one file llama.cpp and ollama load.

Two routes, by what the base is:

* **a GGUF file** (the file a llama.cpp user already runs; the embedded model): every tensor and
  every metadata key (tokenizer, chat template, rope settings) is taken from it. The tensors the
  adapter touches are decoded, put back in transformers' row order (``gguf_names``), merged with
  ``merge_state_dict`` (the pure merge: ``W + s B A``, DoRA's rescaling, ``modules_to_save``
  copies), permuted again and encoded; the others are decoded and encoded in the out type.
* **a transformers directory**: its safetensors are merged the same way and written as llama.cpp's
  converter writes the base (:func:`write_model_gguf`: hyperparameters, names from the ``gguf``
  package's table, Llama's q/k permutation), with the tokenizer of its ``tokenizer.json``
  (byte-level BPE only; for others give the base's ``.gguf``).

Either way the merge is computed in float32 and rounded once to the out type.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import AdapterFileError, ConfigError, gather
from ..models import embedded_model_path, is_embedded
from .adapter import read_adapter
from .gguf_base_check import check_base
from .gguf_names import base_from_config, gguf_base, gguf_name, to_gguf, to_hf
from .gguf_read import decode, read_gguf
from .gguf_write import add_tensor, check_out, file_type, staged_file, write, write_streamed
from .merge_state import adapter_modules, merge_state_dict


def export_merged_gguf(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    out_type: str = "f16",
    *,
    overwrite: bool = False,
    allow_base_mismatch: bool = False,
) -> Path:
    """Write ``base`` with the adapter directory ``adapter`` merged in as the GGUF model ``out``
    (module docstring). ``base``: a ``.gguf`` file, a transformers directory, or None (the base
    the adapter records; the embedded model when it records none). Returns ``out``."""
    from .gguf_export import recorded_base

    target = check_out(out, overwrite)
    file = read_adapter(adapter)
    source = recorded_base(adapter) if base is None else base
    path = embedded_model_path() if is_embedded(source) else Path(source)
    check_base(file, gguf_base(path), allow_base_mismatch)
    if path.is_dir():
        config = _config(path)
        tensors = merge_state_dict(_load_safetensors(path), file)
        write_model_gguf(target, config, tensors, lambda w: add_bpe_vocab(w, path), out_type)
    else:
        merge_into_gguf(path, file, target, out_type)
    return target


def merge_into_gguf(base: Path, file, target: Path, out_type: str) -> None:
    """The GGUF base ``base`` with the adapter ``file`` merged in, written to ``target``."""
    import gguf

    info = gguf_base(base)
    reader = read_gguf(base)
    by_name = {t.name: t for t in reader.tensors}
    modules = adapter_modules(file.tensors)
    keys = [f"{p}.weight" for p in modules if p] + list(modules[""])
    names, problems = {}, []
    for key in keys:
        name = gguf_name(info, key)
        if name is None or name not in by_name:
            problems.append(f"{key}: the base's GGUF has no tensor for it ({name or 'no name'})")
        names[key] = name
    gather(problems, AdapterFileError, f"cannot merge {file.directory} into {base}")
    # Every shape checked before anything is written: the merge run on meta tensors.
    meta = {key: torch.empty(by_name[name].shape, device="meta") for key, name in names.items()}
    merge_state_dict(meta, file)
    keys_of = {name: key for key, name in names.items()}

    def produce(t) -> torch.Tensor:
        """Tensor ``t`` as written: decoded, and merged where the adapter touches it (one
        tensor at a time, so memory holds one weight and the adapter)."""
        if t.name not in keys_of:
            return decode(t)
        key = keys_of[t.name]
        weight = {key: to_hf(info, t.name, decode(t))}
        return to_gguf(info, t.name, merge_state_dict(weight, file, strict=False)[key])

    skipped = ("general.architecture", "general.file_type")
    with staged_file(target) as staged:
        writer = gguf.GGUFWriter(staged, info.arch)
        for key, (value, vtype, item) in reader.fields.items():
            if key not in skipped:
                writer.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type=item)
        writer.add_file_type(file_type(out_type))
        streamed = [(t.name, t.shape, functools.partial(produce, t)) for t in reader.tensors]
        write_streamed(writer, streamed, out_type)


# -- a transformers directory ------------------------------------------------------------------
def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path / 'config.json'}: cannot read the base's config: {exc}") from None
    return {**config, **config.get("text_config", {})}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors weights (give the base's .gguf instead)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def write_model_gguf(
    target: Path,
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    vocab: Callable,
    out_type: str = "f32",
) -> None:
    """Write a transformers model (its ``config.json`` as a dict, its state dict) as the GGUF
    model llama.cpp's converter would write; ``vocab(writer)`` adds the tokenizer's metadata."""
    import gguf

    source = str(target)
    info = base_from_config(dict(config), source)
    arch, n_head = info.arch, info.n_head
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(
            f"{source}: rope scaling {rope_type!r} is not written by this converter; give the "
            "base's own .gguf file as the base"
        )
    problems, named = [], {}
    for key, tensor in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or (info.tied and key == "lm_head.weight"):
            continue
        name = gguf_name(info, key)
        if name is None:
            problems.append(f"{key}: no {arch} tensor of llama.cpp holds it")
            continue
        named[name] = to_gguf(info, name, tensor.float())
    gather(problems, ConfigError, f"cannot write {source}")

    with staged_file(target) as staged:
        w = gguf.GGUFWriter(staged, arch)
        w.add_name(str(config.get("_name_or_path") or Path(source).stem))
        w.add_file_type(file_type(out_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(int(config["vocab_size"]))
        w.add_context_length(int(config.get("max_position_embeddings") or 2048))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(info.n_layers)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(info.n_head_kv)
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        w.add_rope_dimension_count(head_dim)
        if head_dim != int(config["hidden_size"]) // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        vocab(w)
        for name, tensor in named.items():
            add_tensor(w, name, tensor, out_type)
        write(w)


def add_bpe_vocab(writer, directory: Path) -> None:
    """The tokenizer of ``directory/tokenizer.json`` (byte-level BPE, "gpt2" in llama.cpp's
    terms) as GGUF metadata: tokens, their types, merges, special tokens, chat template."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    path = directory / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: cannot read the tokenizer ({exc}); give the base's .gguf file as the base"
        ) from None
    model = data.get("model", {})
    refused = ConfigError(
        f"{path}: a {model.get('type')!r} tokenizer; only byte-level BPE tokenizers are "
        "converted here, give the base's .gguf file as the base"
    )
    if model.get("type") != "BPE":
        raise refused
    try:
        bpe = BpeVocab(directory)
    except (FileNotFoundError, TypeError, KeyError):  # gguf's reader: not byte-level
        raise refused from None
    tokens, types = [], []
    for text, _score, kind in bpe.all_tokens():
        tokens.append(text)
        types.append(kind)
    # Added tokens are matched whole before BPE: special ones (<|im_start|>) as CONTROL, others
    # as USER_DEFINED, as llama.cpp's converter marks them.
    for added in data.get("added_tokens") or []:
        if 0 <= added.get("id", -1) < len(types):
            special = added.get("special")
            types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    # The pre-tokenizer's regex is llama.cpp's default ("gpt2"); a base whose converter names
    # another (SmolLM2: "smollm") splits text the same way for most inputs, but give its .gguf
    # for exact tokenization.
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    SpecialVocab(directory, load_merges=True).add_to_gguf(writer, quiet=True)
