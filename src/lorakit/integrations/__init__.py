"""lorakit with other libraries: transformers' Trainer, TRL, and code written for PEFT.

* ``apply_lora`` takes a ``peft.LoraConfig`` as well as lorakit's (``peft_config``);
* on a transformers model, ``model.save_pretrained``, ``model.set_adapter`` and
  ``model.active_adapters`` work with lorakit's adapters (``transformers_methods``), so the
  Trainer's checkpoints and final save are adapter directories in PEFT's layout
  (``adapter_dirs``);
* :class:`AdapterCheckpoints` (``trainer``) lets a Trainer resume from those checkpoints;
  ``LoraTrainer`` and ``LoraSFTTrainer`` are transformers' ``Trainer`` and TRL's ``SFTTrainer``
  with it.

Importing this package imports neither transformers, peft nor TRL: ``LoraTrainer`` and
``LoraSFTTrainer`` are built when first asked for.
"""

from __future__ import annotations

from typing import Any

from .adapter_dirs import load_adapters, write_adapters
from .peft_config import from_peft_config
from .trainer import AdapterCheckpoints

# LoraTrainer and LoraSFTTrainer are left out of __all__: a star import would build them, and
# so import transformers and TRL (which may not be installed).
__all__ = ["AdapterCheckpoints", "from_peft_config", "load_adapters", "write_adapters"]

_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name in ("LoraTrainer", "LoraSFTTrainer"):
        if name not in _BUILT:
            from . import trainer

            _BUILT[name] = (
                trainer.lora_trainer() if name == "LoraTrainer" else trainer.lora_sft_trainer()
            )
        return _BUILT[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
