"""Training past one process: torchrun's processes, DDP or FSDP2, and what rank 0 alone does.

``torchrun --nproc_per_node N -m lorakit train CONFIG.yaml`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set (several machines: torchrun's rendezvous, the same
command on each). :func:`start` reads them and joins the process group: NCCL on CUDA (each
process on ``cuda:LOCAL_RANK``), gloo on the CPU, with ``training.distributed_timeout`` as the
bound on any wait. ``training.distributed`` chooses how the model is spread: ``ddp`` (the
adapters replicated, their gradients all-reduced; the frozen base is never communicated),
``fsdp`` (FSDP2's ``fully_shard`` per decoder block and at the root: the frozen base sharded
too, each rank holding about 1/N of it), ``auto`` (ddp), ``none`` (refused under torchrun).
One process (no torchrun) is a ``World()`` of one, for which nothing here does anything.

**The same run as one process.** Every rank draws the same global micro-batches (the same seed,
the same :class:`~lorakit.train.data.Batches`) and keeps its share (:meth:`World.share`), so
the global batch and the data order are one process's. Each rank's summed loss is divided by
the trained tokens of the whole global step (summed across ranks), and the gradients are
*summed* across ranks, so the gradient is exactly one process's. DDP and FSDP2 reduce by
averaging, except where they do not (FSDP2 on gloo has summed in some torch versions): which
one the wrapper does is measured once at the start on a one-weight probe (:func:`_reduction`),
and the loss is scaled to match (:attr:`World.grad_scale`).

**Who does what.** Every rank checks the config, the data and the output directory before any
weight loads (:meth:`World.together`: a failure on one rank stops every rank, each naming the
rank and its message); every rank evaluates (the same rows: with FSDP every rank must take part
in each forward); rank 0 alone prints, draws progress, writes metrics, checkpoints, plots, the
report and the adapter. What rank 0 writes is what one process writes: checkpoints hold the
full (gathered) trainable parameters and optimizer state, so a run resumes on another number
of processes; the adapter's base fingerprint is one process's (taken before sharding).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LorakitError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(LorakitError, RuntimeError):
    """Another process of the run failed, or the processes cannot work together."""


@dataclass
class World:
    """This process's place in the run (see the module docstring)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    mode: str = "none"  # none | ddp | fsdp
    backend: str | None = None
    #: the loss is multiplied by this before backward so that the wrapper's reduction sums
    grad_scale: float = 1.0
    #: the adapted base's fingerprint, taken before FSDP shards the weights
    fingerprint: dict | None = None
    _group: bool = field(default=False, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    # -- collectives (each a no-op alone) ---------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one all-reduce, in float64)."""
        if not self._group:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        if not self._group:
            return [value]
        import torch.distributed as dist

        mine = torch.tensor([value], dtype=torch.float64, device=self._device())
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        return [float(t) for t in every]

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed; if any did, every rank raises: the failed ones
        their own error, the others a :class:`DistributedError` naming the failed ranks."""
        if not self._group:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        said = [None] * self.size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(said, mine)  # strings among this run's own processes
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if error is not None:
            raise error
        if failed:
            listed = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise DistributedError(f"the run stopped on {len(failed)} process(es): {listed}")

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Run the block on every rank; whichever rank fails, every rank stops (``agree``)."""
        try:
            yield
        except BaseException as exc:
            self.agree(exc)
            raise
        self.agree(None)

    def barrier(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.barrier()

    def share(self, rows: list) -> list:
        """This rank's rows of a global micro-batch: a contiguous slice, the slices in rank order
        making up the whole (equal row counts: the blocks of a many-adapter run stay equal)."""
        n = len(rows)
        return rows[self.rank * n // self.size : (self.rank + 1) * n // self.size]

    def balanced_share(self, rows: list) -> list:
        """This rank's rows of a global micro-batch, split so that each rank's padded tokens
        are about even (``shares.balanced_shares`` on the rows' lengths)."""
        if self.size == 1:
            return rows
        from .shares import balanced_shares

        mine = balanced_shares([len(r.ids) for r in rows], self.size)[self.rank]
        return [rows[i] for i in mine]

    def close(self, clean: bool = True) -> None:
        """Leave the process group; ``clean``: after every rank has finished (so that none
        tears its connections down while another still uses them)."""
        if self._group:
            import torch.distributed as dist

            if clean:
                dist.barrier()
            dist.destroy_process_group()
            self._group = False

    def _device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- the model ------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the training steps call it: DDP around it, or FSDP2 units in it (in
        place), or the model itself alone."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.backend == "nccl" else None
            self.grad_scale = self.size / _reduction(
                lambda m: DistributedDataParallel(m, device_ids=ids), self._device()
            )
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from ..io import fingerprint as fp
            from ..model import lora_layers

            self.fingerprint = fp.fingerprint(model, [p for p, _ in lora_layers(model)])
            shard = _fully_shard()
            self.grad_scale = self.size / _reduction(shard, self._device())
            blocks = _blocks(model)
            for block in blocks:
                shard(block)
            shard(model)
            return model
        return model

    def held(self, model: nn.Module) -> tuple[int, int]:
        """(bytes of the model's parameters and buffers this process holds, bytes of the whole
        model): with FSDP about 1/N of it, else all of it."""
        mine = whole = 0
        for t in [*model.parameters(), *model.buffers()]:
            size = t.element_size()
            local = t.to_local() if hasattr(t, "to_local") else t
            mine += local.numel() * size
            whole += t.numel() * size
        return mine, whole

    def inner(self, model: nn.Module) -> nn.Module:
        """The model without DDP's wrapper (names and parameters as one process has them)."""
        return getattr(model, "module", model) if self.mode == "ddp" else model


def _fully_shard():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return lambda module: fully_shard(module, mp_policy=policy)


def _reduction(wrap, device: torch.device) -> float:
    """What the wrapper's gradient reduction does to gradients of 1 on every rank: 1 when it
    averages, the number of ranks when it sums."""
    probe = nn.Linear(1, 8, bias=False).to(device)
    wrapped = wrap(probe)
    wrapped(torch.ones(1, 1, device=device)).sum().backward()
    grad = probe.weight.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return float(grad.mean())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformers' ``_no_split_modules``), each an FSDP unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not blocks:
        raise ConfigError(
            f"training.distributed=fsdp: cannot find the blocks of {type(model).__name__} to "
            "shard (it names no _no_split_modules); use training.distributed=ddp"
        )
    return blocks


def start(training: Any, device_name: str) -> World:
    """This process's :class:`World` from torchrun's environment (one process without it), the
    process group joined. ``training``: the config's training section."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    values = {}
    for key in ENV:
        raw = os.environ.get(key)
        try:
            values[key] = int(raw) if raw is not None else None
        except ValueError:
            raise ConfigError(f"the environment variable {key}={raw!r} is not an integer") from None
    size, rank, local = values["WORLD_SIZE"], values["RANK"] or 0, values["LOCAL_RANK"] or 0
    if size is None or size < 1 or not 0 <= rank < size:
        raise ConfigError(f"torchrun's environment is inconsistent: RANK={rank}, WORLD_SIZE={size}")
    mode = training.distributed
    if size == 1:
        return World()
    if mode == "none":
        raise ConfigError(
            f"training.distributed=none, but torchrun started {size} processes: run one process, "
            "or choose ddp or fsdp"
        )
    if training.batch_size < size:
        raise ConfigError(
            f"training.batch_size={training.batch_size} is less than the {size} processes: each "
            "process needs at least one row of every micro-batch (batch_size is the global batch)"
        )
    if mode == "fsdp" and training.method == "full":
        raise ConfigError(
            "training.method=full with training.distributed=fsdp is not supported: use ddp, "
            "or method lora or qlora"
        )
    import torch.distributed as dist

    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=training.distributed_timeout)
    dist.init_process_group(backend, timeout=timeout)
    return World(size, rank, local, "ddp" if mode == "auto" else mode, backend, _group=True)


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (a DTensor) gathered whole, on every rank; any other tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as ``param`` is (sharded the same way when it is a DTensor)."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.to(param.device_mesh.device_type), param.device_mesh, param.placements
    )
