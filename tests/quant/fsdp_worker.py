"""What each rank of test_quant_fsdp.py runs, and the harness that starts the ranks.

A module of its own (not a test file) so that processes started with the "spawn" method can
import it: they get the parent's ``sys.path`` and unpickle ``run_rank`` by its module name.
Each rank writes what it measured to ``rank<r>.pt``; the test process holds the reference.
"""

from __future__ import annotations

import datetime
import socket
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from quant_models import LLAMA, tiny_llama

import lorakit
from lorakit import LoraConfig
from lorakit.errors import QuantError

WORLD = 2
CONFIG = LoraConfig(r=4, alpha=8, target_modules="all-linear")
LR = 0.1
PROBE = "model.layers.0.self_attn.q_proj"  # the layer whose weight is read during forward


def build() -> torch.nn.Module:
    """QLoRA's model: NF4 with double quantization, LoRA on every linear, B not zero."""
    model = lorakit.quant.quantize(tiny_llama(), "nf4", double_quant=True)
    model = lorakit.apply_lora(model, CONFIG)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def tokens() -> torch.Tensor:
    """The fixed batch: 2 rows per rank."""
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, LLAMA["vocab_size"], (2 * WORLD, 9), generator=gen)


def sgd_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model(x, labels=x).loss.backward()
    optimizer.step()


def quantized_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> the frozen parameters holding the quantized weights' codes and scales."""
    return {
        f"{path}.{name}": p
        for path, weight in lorakit.quant.quantized_weights(model)
        for name, p in weight.named_parameters()
    }


def shard(model: torch.nn.Module, mesh, **options) -> None:
    """``fully_shard`` each decoder block, then the root: all a training loop does."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def run_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        x = tokens()
        model = build()
        shard(model, mesh)
        stored = quantized_parameters(model)
        held, whole = lorakit.quant.quantized_storage_bytes(model)
        result = {
            "held": held,
            "whole": whole,
            "local": sum(p.to_local().numel() * p.element_size() for p in stored.values()),
            "all_dtensors": all(isinstance(p, DTensor) for p in stored.values()),
        }
        with torch.no_grad():
            result["logits"] = model(x).logits
        sgd_step(model, x[2 * rank : 2 * rank + 2])
        result["lora"] = {
            n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad
        }
        result["codes"] = {n: p.full_tensor() for n, p in stored.items()}
        result["code_grads"] = [n for n, p in stored.items() if p.grad is not None]
        result["state_dict"] = {
            k: v.full_tensor() if isinstance(v, DTensor) else v
            for k, v in model.state_dict().items()
        }
        probe = model.get_submodule(PROBE).weight
        try:
            probe.dequantize()
        except QuantError as exc:
            result["sharded_error"] = str(exc)
        block = model.model.layers[0]
        block.unshard()  # gathered by hand, as a merge after training would need
        result["unsharded_weight"] = probe.dequantize()
        block.reshard()

        # Gradient checkpointing (non-reentrant, as lorakit's training sets it up): the block's
        # forward runs again inside backward, on the codes gathered for backward.
        checkpointed = build().train()
        checkpointed.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        shard(checkpointed, mesh)
        sgd_step(checkpointed, x[2 * rank : 2 * rank + 2])
        result["checkpointed_lora"] = {
            n: p.full_tensor() for n, p in checkpointed.named_parameters() if p.requires_grad
        }

        # Mixed precision as QLoRA runs it: adapters gathered in bfloat16; the codes stay bytes.
        mixed = build()
        shard(mixed, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        seen = {}

        def read_weight(module, args) -> None:  # the weight as the sharded forward decodes it
            seen.setdefault("weight", module.weight.dequantize())

        mixed.get_submodule(PROBE).register_forward_pre_hook(read_weight)
        with torch.no_grad():
            result["mixed_logits"] = mixed(x).logits
        result["mixed_weight"] = seen["weight"]
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir: Path, timeout: float = 120.0) -> list[dict]:
    """Run ``run_rank`` in WORLD spawned processes; their results, by rank.

    A rank that raises fails the caller with that rank's traceback (``ProcessRaisedException``);
    ranks still running after ``timeout`` seconds are killed and the caller fails saying so.
    """
    context = mp.start_processes(
        run_rank, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD} ranks were still running after {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
