"""Data parallelism on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each process passes its own shard of the data. Every gradient of the bilevel step (the train
gradient, with its selector part on a DARTS step, the validation gradient, DARTS's
finite-difference pass) is averaged across processes where it is computed
(:meth:`~autolora.search.bilevel.Bilevel.value_and_grad`), so each process takes the step the
single-process maths would take on the union of the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autolora.errors import ConfigError, DataError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean of each tensor over all processes (one all-reduce per dtype)."""
        out: list[torch.Tensor] = list(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = flat[offset : offset + n].view_as(tensors[i])
                offset += n
        return out

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Copy process 0's values into every process's tensors, in place."""
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def check_same_length(self, n: int, what: str, device: torch.device) -> None:
        """Raise on every process (never hang) unless all shards have ``n`` batches."""
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device))
        lengths = [int(c) for c in counts]
        if len(set(lengths)) > 1:
            raise DataError(
                f"{what} has a different number of batches on each process ({lengths}); data-parallel search "
                "needs equal shards. Drop the remainder (DistributedSampler(drop_last=True) or "
                "DataLoader(drop_last=True)) so every process gets the same count."
            )

    def barrier(self) -> None:
        dist.barrier()


def launched() -> bool:
    """Whether this process was started by a launcher for two or more processes (or already
    belongs to such a group), so a search here will run data-parallel."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() >= 2
    return all(v in os.environ for v in LAUNCHER_VARS) and int(os.environ["WORLD_SIZE"]) >= 2


def init_distributed(device: torch.device) -> DistContext | None:
    """The process group's context, initialising it from a launcher's environment if needed.

    ``torchrun`` and ``accelerate launch`` set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
    with those present and no group yet, one is created (NCCL for a CUDA model, gloo otherwise).
    Returns ``None`` for a single process.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not all(v in os.environ for v in LAUNCHER_VARS) or int(os.environ["WORLD_SIZE"]) < 2:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    if world < 2:
        return None
    if device.type == "cuda" and dist.get_backend() != "nccl":
        raise ConfigError("the model is on a GPU but the process group uses gloo; initialise it with backend='nccl'.")
    return DistContext(dist.get_rank(), world)
