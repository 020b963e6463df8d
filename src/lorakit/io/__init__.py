"""Adapter files in PEFT's layout (read and write), merged-model export, inspection.

``save_adapter`` / ``load_adapter`` (``adapter``) write and read PEFT adapter directories through
the key mapping of ``peft_format``, with the base model's ``fingerprint`` in the file and the
crash-safe writes of ``safety`` (whose staging directories ``staging`` makes, locks and cleans
after a killed save). ``export_merged`` (``export``) writes a plain transformers model
directory with an adapter folded in; ``inspect_adapter`` (``inspect``) describes an adapter
directory without loading a model; ``hotswap_adapter`` (``hotswap``) replaces a loaded adapter's
weights in place from another directory, without recompiling a compiled model;
``merge_state_dict`` (``merge_state``) folds an adapter's tensors into a base state dict, or one
shard of it, with no model; ``merge_shards`` (``shard_merge``) merges an adapter into a
safetensors base directory one tensor at a time, without loading the model; ``export_gguf``
(``gguf_export``) writes an adapter, or the merged model, as a GGUF file for llama.cpp and ollama.
safetensors, transformers and gguf are imported when first used.
"""

from .adapter import AdapterFile, load_adapter, read_adapter, save_adapter
from .export import export_merged
from .gguf_export import export_gguf
from .hotswap import hotswap_adapter, pad_adapter_rank
from .inspect import format_adapter, inspect_adapter
from .merge_state import merge_state_dict, merged_state_dict
from .shard_merge import merge_shards

__all__ = [
    "AdapterFile",
    "export_gguf",
    "export_merged",
    "format_adapter",
    "hotswap_adapter",
    "inspect_adapter",
    "load_adapter",
    "merge_shards",
    "merge_state_dict",
    "merged_state_dict",
    "pad_adapter_rank",
    "read_adapter",
    "save_adapter",
]
