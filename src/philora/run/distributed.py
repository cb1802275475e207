"""torch.distributed plumbing for ``torchrun``: process group, rank facts, reductions, checks.

Under torchrun (``WORLD_SIZE`` > 1) each process joins the group (NCCL on CUDA, gloo on CPU)
and trains a DistributedDataParallel replica (or an FSDP shard, see fsdp.py); without it
everything here is a no-op, so the training loop reads the same either way.

Data: every optimizer step reads ``world x per_device_train_batch_size x
gradient_accumulation_steps`` consecutive samples of one global order, split by rank, so the
data position is a count of global samples and a run resumes on any world size that keeps the
global batch. Dropout: each rank reseeds its RNG at every step from (seed, rank, step), so ranks
draw different masks and a resume on the same world size is bit-identical, with no RNG state to
gather.
"""

import datetime
import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.errors import PhiloraError
from .fsdp import FSDP_QUANT_ERROR, FSDPLoRA

@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank among ``size`` processes (1: no torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False  # setup() created the process group (then teardown() destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def setup() -> World:
    """Join the process group if launched by torchrun; returns this process's facts."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owned = not dist.is_initialized()
    if owned:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return World(rank, size, local_rank, owned)


def teardown(world: World) -> None:
    """Leave the group if setup() created it (a caller's own group stays up)."""
    if world.enabled and dist.is_initialized() and world.owned:
        dist.destroy_process_group()


def all_sum(world: World, *values: torch.Tensor) -> list:
    """Sum each tensor over ranks (one collective); returns new tensors."""
    flat = torch.stack([torch.as_tensor(v).detach().double().reshape(()) for v in values])
    if world.enabled:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(backend_device)
        dist.all_reduce(flat)
    return [x.cpu() for x in flat.unbind(0)]


def broadcast_object(world: World, obj):
    """rank 0's ``obj`` on every rank."""
    if not world.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(world: World, fn):
    """``fn()`` run on rank 0 only, its result on every rank; a PhiloraError it raises is
    raised on every rank (instead of the others waiting for a result that never comes)."""
    result, error = None, None
    if world.main:
        try:
            result = ("ok", fn())
        except PhiloraError as e:
            result, error = ("error", str(e)), e
    status, value = broadcast_object(world, result)
    if status == "error":
        raise error if error is not None else PhiloraError(value)  # rank 0 keeps the error's type
    return value


def local_first(world: World, fn):
    """``fn()`` on each node's first process (local rank 0), then on the node's other processes,
    which find what it cached (tokenized data: one process per node tokenizes, the others map
    its files). A PhiloraError on a first process is raised on every rank. The wait is a gloo
    collective with a long timeout: tokenizing a large set can outlast NCCL's 10 minutes."""
    if not world.enabled:
        return fn()
    # Made by every rank before anyone starts work: creating a group is itself a collective.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
    result, error = None, None
    if world.local_rank == 0:
        try:
            result = fn()
        except PhiloraError as e:
            error = e
    errors = [None] * world.size
    dist.all_gather_object(errors, None if error is None else str(error), group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    failed = next((e for e in errors if e), None)
    if failed:
        raise PhiloraError(failed)
    return result if world.local_rank == 0 else fn()


def barrier(world: World) -> None:
    if world.enabled:
        dist.barrier()


def eval_batches(world: World, examples: list, batch: int) -> list:
    """This rank's eval batches as (examples, counted) pairs, the same number on every rank
    (FSDP runs each forward on all ranks together): a rank short of data runs a stand-in batch
    that is not counted."""
    mine = examples[world.rank::world.size]
    n = math.ceil(math.ceil(len(examples) / world.size) / batch)
    out = [(mine[s:s + batch], True) for s in range(0, len(mine), batch)]
    return out + [(examples[:1], False)] * (n - len(out))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of ``rank`` for optimizer step ``step``: distinct per (seed, rank, step)."""
    digest = hashlib.blake2b(f"philora/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: valid for every torch generator


def global_batch(world: World, per_device: int, accumulation: int) -> int:
    return world.size * per_device * accumulation


def check_run(world: World, cfg, n_train: int) -> None:
    """Before the model loads: the world size must fit the data (one global micro-batch of
    distinct training samples), and FSDP cannot shard a 4-bit base."""
    per_device = cfg.training_config.per_device_train_batch_size
    if world.enabled and n_train < world.size * per_device:
        raise PhiloraError(f"the training set has {n_train} examples, fewer than one micro-batch "
                           f"across {world.size} processes ({world.size} x per_device_train_batch_size "
                           f"{per_device}); use fewer processes or a smaller per_device_train_batch_size")
    if world.enabled and cfg.training_config.fsdp and cfg.model.quantization:
        raise PhiloraError(FSDP_QUANT_ERROR)


def check_resume(world: World, trainer_state: dict, per_device: int, accumulation: int) -> None:
    """A checkpoint resumes on any world size that keeps its global batch (steps, the LR
    schedule and the data position all count in it)."""
    step, seen = trainer_state.get("step", 0), trainer_state.get("samples_seen", 0)
    was = trainer_state.get("global_batch") or (seen // step if step else None)
    now = global_batch(world, per_device, accumulation)
    if was and was != now:
        old_world = trainer_state.get("world_size", "?")
        raise PhiloraError(f"--resume: the checkpoint was trained with a global batch of {was} "
                           f"({old_world} processes), this run's is {now} ({world.size} x {per_device} x "
                           f"{accumulation}); set per_device_train_batch_size / "
                           f"gradient_accumulation_steps so that processes x batch x accumulation = {was}")


def wrap(module: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DistributedDataParallel (or FSDP) around ``module`` (only LoRA parameters train)."""
    if fsdp:
        return FSDPLoRA(module, device)
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # forward_sync_buffers=False: the model's buffers are constants (rotary tables), and a buffer
    # broadcast in every forward would hang an eval where ranks run different batch counts.
    return DDP(module, device_ids=ids, forward_sync_buffers=False)
