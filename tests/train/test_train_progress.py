"""The console: plain lines every few steps off a terminal, a progress bar on one."""

import io

from lorakit.train.progress import Console

VALUES = {"loss": 0.5, "lr": 1e-3, "tokens_per_s": 1234.5}


def test_plain_lines_every_few_steps_with_eta():
    out = io.StringIO()
    console = Console(total=25, every=10, stream=out)
    assert console.bar is None  # a StringIO is not a terminal
    for step in range(1, 26):
        console.log("train", step, VALUES)
    console.log("eval", 25, {"loss": 0.25, "exact": 3, "total": 4})
    console.close()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["1/25", "10/25", "20/25", "25/25"]
    assert lines[0].startswith("step  1/25  loss 0.5000  lr 1.00e-03  1,234 tok/s  eta ")
    assert lines[-1] == "eval at step 25: held-out loss 0.2500, exact match 3/4"


def test_a_bar_on_a_terminal_with_loss_lr_throughput_and_eta():
    out = io.StringIO()
    console = Console(total=20, start=5, stream=out, bar=True)
    for step in range(6, 21):
        console.log("train", step, VALUES)
    console.message("a message")
    console.close()
    text = out.getvalue()
    assert "20/20" in text and "loss 0.5000  lr 1.00e-03  1,234 tok/s" in text
    assert "a message" in text and "<00:00" in text  # tqdm's elapsed<remaining
