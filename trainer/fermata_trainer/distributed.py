"""Single-process or ``torchrun`` multi-GPU: who this process is and how ranks agree.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains its shard of each batch through
DistributedDataParallel; rank 0 alone prepares data, evaluates, reports and writes checkpoints
while the others wait at a barrier. Stop decisions (SIGTERM, a stop file, a checkpoint request)
are combined with an all-reduce so that every rank stops after the same step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from fermata_trainer.logging_setup import get_logger

log = get_logger(__name__)

#: A worker stops (after a checkpoint) when this file exists; the launcher creates it on SIGTERM
#: so the ``torchrun`` agent itself never sees the signal (it would kill workers after 30 s).
ENV_STOP_FILE = "FERMATA_STOP_FILE"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def dist_info_from_env(environ: Mapping[str, str] | None = None) -> DistInfo:
    env = os.environ if environ is None else environ
    if not launched_by_torchrun(env):
        return DistInfo()
    return DistInfo(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
    )


def init_distributed(info: DistInfo) -> torch.device:
    """Join the process group (when distributed) and return this rank's device."""
    use_cuda = torch.cuda.is_available()
    if info.enabled:
        import torch.distributed as dist

        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=timedelta(hours=2),  # rank 0 tokenizes while the others wait
            )
        log.info("distributed_initialized", rank=info.rank, world_size=info.world_size)
    if use_cuda:
        return torch.device("cuda", info.local_rank if info.enabled else 0)
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def any_rank(info: DistInfo, flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags across ranks."""
    if not info.enabled:
        return flags
    import torch.distributed as dist

    tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
