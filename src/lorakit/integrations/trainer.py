"""transformers' ``Trainer`` (and TRL's trainers built on it) with lorakit adapters.

Saving needs nothing from here: ``apply_lora`` gives a transformers model an adapter-aware
``save_pretrained`` (``transformers_methods``), which every Trainer calls for its checkpoints and
for ``save_model``, so each ``checkpoint-N`` holds ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's layout (beside the Trainer's own optimizer, scheduler and
RNG state) and no ``model.safetensors``.

Loading does: the Trainer reads a checkpoint back itself, and takes a model that is not a
``PeftModel`` to be saved whole, so resuming from an adapter checkpoint failed ("Can't find a
checkpoint index"). :class:`AdapterCheckpoints` is a mixin that reads the adapters back with
``lorakit.load_adapter`` instead (strict: every tensor, each shape, the base model's fingerprint),
for ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``. The tensors are copied
into the model's own adapter parameters, so the optimizer state the Trainer restores next refers
to them. Models without lorakit adapters go through the Trainer's own code::

    from lorakit.integrations import AdapterCheckpoints

    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError(f"LoraSFTTrainer needs TRL (pip install trl): {exc}") from exc


    class LoraSFTTrainer(AdapterCheckpoints, SFTTrainer):
        pass

``lorakit.integrations.LoraTrainer`` is ``transformers.Trainer`` with the mixin;
``lorakit.integrations.LoraSFTTrainer`` is TRL's ``SFTTrainer`` with it (when TRL is installed).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model import list_adapters
from .adapter_dirs import load_adapters


class AdapterCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass: checkpoints of a lorakit-adapted model are
    read back as adapters (resume, best model at the end). Put it first among the bases."""

    def _lorakit_model(self, model: nn.Module | None = None) -> nn.Module | None:
        """The model without its wrappers (DDP, compile), if it has lorakit adapters."""
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return unwrapped if list_adapters(unwrapped) else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapted = self._lorakit_model(model)
        if adapted is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(adapted, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        adapted = self._lorakit_model()
        if adapted is None:
            return super()._load_best_model()
        load_adapters(adapted, self.state.best_model_checkpoint)
        return None


def lora_trainer() -> type:
    """``transformers.Trainer`` with :class:`AdapterCheckpoints`."""
    from transformers import Trainer

    return type("LoraTrainer", (AdapterCheckpoints, Trainer), {"__module__": __name__})


def lora_sft_trainer() -> type:
    """TRL's ``SFTTrainer`` with :class:`AdapterCheckpoints`."""
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise ImportError(f"LoraSFTTrainer needs TRL (pip install trl): {exc}") from exc

    return type("LoraSFTTrainer", (AdapterCheckpoints, SFTTrainer), {"__module__": __name__})
