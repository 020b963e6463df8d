"""The README's demo: ``lorakit train examples/date_demo.yaml``, run from Python.

    python examples/date_demo.py [section.key=value ...]

Fine-tunes the embedded SmolLM2-135M-Instruct with the defaults (LoRA r=8 on every linear layer, lr
and epochs ``auto``) to write dates given in eight styles ("March 5, 1987", "5 Mar 1987",
"3/5/1987", "1987.03.05", ...) as ISO ``YYYY-MM-DD``, and prints the held-out exact match before
and after. The adapter, metrics.jsonl, loss.png and report.md land in runs/date_demo/. Arguments are
overrides of the config, e.g. ``training.steps=40``.
"""

import sys
from pathlib import Path

from lorakit.cli.main import main

if __name__ == "__main__":
    config = Path(__file__).with_name("date_demo.yaml")
    raise SystemExit(main(["train", str(config), *sys.argv[1:]]))
