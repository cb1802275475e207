"""torch.distributed plumbing for ``torchrun``: process group, rank facts, reductions.

Under torchrun (``WORLD_SIZE`` > 1) each process joins the group (NCCL on CUDA, gloo on CPU)
and trains a DistributedDataParallel replica; without it everything here is a no-op, so the
training loop reads the same either way.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the process group if launched by torchrun; returns this process's facts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return Dist(rank, world, local_rank)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, *values: torch.Tensor) -> list:
    """Sum each tensor over ranks (one collective); returns new tensors."""
    flat = torch.stack([v.detach().double().reshape(()) for v in values])
    if d.enabled:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(backend_device)
        dist.all_reduce(flat)
    return [x.cpu() for x in flat.unbind(0)]


def broadcast_object(d: Dist, obj):
    """rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap(module: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (only LoRA parameters are trainable)."""
    if fsdp:
        from .fsdp import wrap_fsdp
        return wrap_fsdp(module, device)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)
