"""The training loss in a mixed-adapter batch: the output head sees the kept tokens of every row
flattened (transformers' boolean ``logits_to_keep``), and each token still gets its own row's
adapter, for a saved ``lm_head`` (``modules_to_save``) and a LoRA ``lm_head`` alike.

Reference: each row's loss computed alone, with its adapter set (or adapters disabled), from the
full logits sliced afterwards: another path through the model for the same numbers.
"""

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterError
from lorakit.generate import IGNORE
from lorakit.train.loss import group_losses, token_loss
from tiny_models import randomise, tiny_llama

VOCAB = 128
NAMES = ["a", "b", None, "a"]
# trained tokens per row: 5, 2, 3 and 1 (not a multiple of the rows, nor equal per row, so a head
# reading the flattened tokens as rows of equal length would fail or mix rows up)
ANSWERS = [5, 2, 3, 1]
SEQ = 9

HEADS = {
    "saved lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "lora lm_head": dict(target_modules=["q_proj", "lm_head"]),
}


def adapted(head: dict):
    model = tiny_llama()
    model = lorakit.apply_lora(model, LoraConfig(r=4, **head), "a")
    model = lorakit.apply_lora(model, LoraConfig(r=2, **head), "b")
    return randomise(model).eval()


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (len(NAMES), SEQ), generator=gen)
    labels = torch.full_like(ids, IGNORE)
    for row, n in enumerate(ANSWERS):
        labels[row, SEQ - n :] = ids[row, SEQ - n :]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def row_alone(model, data, row: int) -> torch.Tensor:
    """Row ``row``'s summed loss with its adapter alone, from full logits sliced afterwards."""
    ids = data["input_ids"][row : row + 1]
    labels = data["labels"][row : row + 1, 1:]
    name = NAMES[row]
    with torch.no_grad():
        if name is None:
            with lorakit.disable_adapters(model):
                out = model(input_ids=ids).logits
        else:
            lorakit.set_adapter(model, name)
            out = model(input_ids=ids).logits
    mask = labels != IGNORE
    return F.cross_entropy(out[:, :-1][mask].float(), labels[mask], reduction="sum")


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_each_row_of_a_mixed_batch_gets_its_own_head(head):
    model = adapted(head)
    data = batch()
    expected = torch.stack([row_alone(model, data, i) for i in range(len(NAMES))])
    with torch.no_grad(), lorakit.adapter_per_row(model, NAMES):
        per_row = group_losses(model, data, torch.arange(len(NAMES)), len(NAMES))
        total, count = token_loss(model, data)
    torch.testing.assert_close(per_row, expected)
    torch.testing.assert_close(total, expected.sum())
    assert count == sum(ANSWERS)


def test_a_head_gradient_reaches_only_the_rows_adapter():
    model = adapted(HEADS["saved lm_head"])
    data = batch()
    with lorakit.adapter_per_row(model, ["b", "b", None, None]):
        loss, _ = token_loss(model, data)
    loss.backward()
    assert model.lm_head.modules_to_save["b"].weight.grad.abs().sum() > 0
    assert model.lm_head.modules_to_save["a"].weight.grad is None


def test_a_saved_module_refuses_an_input_that_is_not_one_entry_per_row():
    model = adapted(HEADS["saved lm_head"])
    hidden = torch.randn(7, model.config.hidden_size)  # 7 tokens, 4 rows, no kept_tokens block
    with torch.no_grad(), lorakit.adapter_per_row(model, NAMES):
        with pytest.raises(AdapterError, match=r"one entry per row \(4\).*\(7, 128\)"):
            model.lm_head(hidden)
