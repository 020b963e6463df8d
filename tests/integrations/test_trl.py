"""TRL's real ``SFTTrainer`` on a lorakit-adapted tiny Llama (no ``peft_config``), trained on a
chat dataset built in code with the character tokenizer: the plain ``SFTTrainer`` already writes
adapter-sized checkpoints in PEFT's layout, ``LoraSFTTrainer`` resumes from them to the end an
uninterrupted run reaches, and the final save loads in PEFT to the trained outputs
(``assert_close``: PEFT orders the float32 operations differently)."""

import os

import peft
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

import lorakit
from char_tokenizer import char_tokenizer
from lorakit.integrations import LoraSFTTrainer
from tiny_models import logits, tiny_llama

CONFIG = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
STEPS, EVERY = 4, 2


def _dataset():
    chats = [
        [
            {"role": "user", "content": f"add {i} and {i + 1}"},
            {"role": "assistant", "content": str(2 * i + 1)},
        ]
        for i in range(8)
    ]
    return Dataset.from_dict({"messages": chats})


def _adapted(seed=0):
    model = tiny_llama(vocab_size=len(char_tokenizer()))
    torch.manual_seed(seed)  # the adapter's A is drawn here: another seed, another start
    return lorakit.apply_lora(model, CONFIG)


def _args(out):
    return SFTConfig(
        output_dir=str(out),
        max_steps=STEPS,
        save_steps=EVERY,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=64,
        bf16=False,  # TRL's default would wrap the model's forward in bfloat16 autocast
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
    )


def _adapter_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    model = _adapted()
    trainer = SFTTrainer(
        model=model, args=_args(out), train_dataset=_dataset(), processing_class=char_tokenizer()
    )
    trainer.train()
    trainer.save_model()
    return out, model


def test_sft_checkpoints_are_adapter_directories_that_peft_loads(uninterrupted):
    out, model = uninterrupted
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    adapter_bytes = sum(p.numel() * p.element_size() for p in lorakit.adapter_parameters(model))
    for folder in (out / f"checkpoint-{EVERY}", out / f"checkpoint-{STEPS}", out):
        names = set(os.listdir(folder))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert "model.safetensors" not in names
        # no file holds the base: the largest is the optimizer's state of the adapter
        sizes = {f.name: f.stat().st_size for f in folder.iterdir() if f.is_file()}
        assert max(sizes.values()) < base_bytes / 5, (folder, sizes, base_bytes)
        assert sizes["adapter_model.safetensors"] < adapter_bytes + 8192  # tensors + header
    x = torch.tensor([char_tokenizer()("add 3 and 4")["input_ids"]])
    expected = logits(model.eval(), x)
    base = tiny_llama(vocab_size=len(char_tokenizer()))
    assert not torch.allclose(logits(base, x), expected)  # training changed the outputs
    with_peft = peft.PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(with_peft.eval(), x), expected)
    ours = lorakit.load_adapter(tiny_llama(vocab_size=len(char_tokenizer())), out)
    torch.testing.assert_close(logits(ours, x), expected)


def test_sft_resumes_from_an_adapter_checkpoint(uninterrupted, tmp_path):
    _, reference = uninterrupted
    tokenizer = char_tokenizer()
    stopped = LoraSFTTrainer(
        model=_adapted(),
        args=_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        callbacks=[_StopAt(EVERY)],
    )
    stopped.train()
    assert stopped.state.global_step == EVERY

    resumed_model = _adapted(seed=5)
    resumed = LoraSFTTrainer(
        model=resumed_model,
        args=_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    ours, theirs = _adapter_state(resumed_model), _adapter_state(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 12
    for key in ours:  # the same steps on the same shapes in one process: bit for bit
        assert torch.equal(ours[key], theirs[key]), key
