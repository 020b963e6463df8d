"""transformers' real ``Trainer`` on a lorakit-adapted tiny Llama: its checkpoints and final save
are adapter directories in PEFT's layout (no ``model.safetensors``), a run resumed from a
checkpoint ends where an uninterrupted run ends, the best checkpoint comes back at the end, and the
final directory loads in lorakit, in transformers' ``load_adapter`` and in PEFT to the trained
model's outputs (``assert_close``: PEFT and transformers order the float32 operations
differently).
"""

import os

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

import lorakit
from lorakit.integrations import LoraTrainer
from tiny_models import LLAMA, logits, tiny_llama, tokens

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
STEPS, EVERY = 6, 3
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _data(n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LLAMA["vocab_size"], (n, 12), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(out, **extra):
    return TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=EVERY,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        **extra,
    )


def _adapted(seed=0):
    torch.manual_seed(seed)  # the adapter's A is drawn here: another seed, another start
    return lorakit.apply_lora(tiny_llama(), CONFIG)


def _peft_key(key):
    """PEFT's tensor name for lorakit's parameter name of adapter ``default``."""
    return "base_model.model." + key.removesuffix(".default") + ".weight"


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}


class _StopAt(TrainerCallback):
    """Ends the run after ``step`` steps, as an interrupted job would (its checkpoint written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = _adapted()
    trainer = LoraTrainer(model=model, args=_args(out), train_dataset=_data())
    trainer.train()
    trainer.save_model()  # into the output directory, beside the checkpoint folders
    return out, model


def test_checkpoints_and_the_final_save_are_adapter_directories(uninterrupted):
    out, model = uninterrupted
    base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
    for folder in (out / f"checkpoint-{EVERY}", out / f"checkpoint-{STEPS}", out):
        names = set(os.listdir(folder))
        assert ADAPTER_FILES <= names
        assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        assert size < base_bytes / 5, (folder, size, base_bytes)  # adapter-sized, not model-sized
    saved = load_file(out / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    trained = _adapter_state(model)
    assert len(saved) == len(trained) == 8
    for key, value in trained.items():  # PEFT's key for lorakit's parameter
        assert torch.equal(saved[_peft_key(key)], value)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(uninterrupted, tmp_path):
    _, reference = uninterrupted
    first = _adapted()
    stopped = LoraTrainer(
        model=first, args=_args(tmp_path), train_dataset=_data(), callbacks=[_StopAt(EVERY)]
    )
    stopped.train()
    assert stopped.state.global_step == EVERY
    assert not torch.equal(
        _adapter_state(first)["model.layers.0.self_attn.q_proj.lora_B.default"],
        _adapter_state(reference)["model.layers.0.self_attn.q_proj.lora_B.default"],
    )

    resumed_model = _adapted(seed=5)  # a fresh process: another start, the checkpoint decides
    resumed = LoraTrainer(model=resumed_model, args=_args(tmp_path), train_dataset=_data())
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint: checkpoint-3
    assert resumed.state.global_step == STEPS
    ours, theirs = _adapter_state(resumed_model), _adapter_state(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:  # the same steps on the same shapes in one process: bit for bit
        assert torch.equal(ours[key], theirs[key]), key


def test_the_final_save_loads_in_lorakit_transformers_and_peft(uninterrupted):
    out, model = uninterrupted
    x = tokens(LLAMA["vocab_size"])
    expected = logits(model.eval(), x)

    ours = lorakit.load_adapter(tiny_llama(), out)
    torch.testing.assert_close(logits(ours, x), expected)

    theirs = tiny_llama()
    theirs.load_adapter(str(out))  # transformers' own loader (through PEFT)
    torch.testing.assert_close(logits(theirs.eval(), x), expected)

    with_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    torch.testing.assert_close(logits(with_peft.eval(), x), expected)
    assert not torch.allclose(logits(tiny_llama(), x), expected)  # the adapter changed them


def test_load_best_model_at_end_brings_the_best_checkpoint_back(tmp_path):
    model = _adapted()
    scores = iter([1.0, 0.0])  # the first evaluation (step 3) scores best, whatever the losses
    args = _args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=EVERY,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    trainer = LoraTrainer(
        model=model,
        args=args,
        train_dataset=_data(),
        eval_dataset=_data(4, 1),
        compute_metrics=lambda _: {"score": next(scores)},
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(f"checkpoint-{EVERY}")
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for key, value in _adapter_state(model).items():
        assert torch.equal(saved[_peft_key(key)], value)
