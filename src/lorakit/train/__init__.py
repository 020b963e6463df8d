"""Fine-tuning: data, the training loop, evaluation, checkpoints, metrics, plots and reports.

``lorakit train config.yaml`` (see :mod:`lorakit.cli.train`) is :func:`load_config` then
:func:`train`; both are usable from Python. The modules, in the order data flows through them:

* ``config``: the YAML training config, validated before any weight loads;
* ``data``: JSONL rows in three shapes, chat templates, loss masks, truncation, packing, batches;
* ``loss``: cross entropy on the trained tokens only;
* ``schedule``: warmup, then cosine or linear decay;
* ``setup``: packages, data, output directory, model, method, tokens: all before the first step;
* ``step``: one optimizer step (gradient accumulation, clipping, the update);
* ``loop``: :func:`train`, the loop itself, from setup to the report;
* ``multi_config``, ``multi``: many adapters in one run (``adapters:`` in the config), each
  trained from its own rows on one shared base, with a summary table;
* ``result``: what a run gives back;
* ``evaluate``: held-out loss and exact match by greedy generation;
* ``requirements``: the packages a run needs, checked before any weight loads;
* ``output``: the output directory, and how a lorakit run is recognised;
* ``checkpoint``, ``resume``: atomic checkpoints, exact resume, damaged checkpoints skipped;
* ``best``: the step with the lowest held-out loss, and early stopping;
* ``metrics``, ``progress``: the logger interface, ``metrics.jsonl``, the console;
* ``plot``, ``report``: ``loss.png`` and ``report.md``;
* ``dates``: an example task generator (dates to ISO format).
"""

from ..errors import DataError
from .config import TrainConfig, load_config
from .evaluate import EvalResult
from .loop import train
from .multi import ManyResult
from .output import TrainingError
from .result import TrainResult

__all__ = [
    "DataError",
    "EvalResult",
    "ManyResult",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "load_config",
    "train",
]
