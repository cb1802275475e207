"""FSDP for bases that do not fit one device: the frozen base sharded, LoRA replicated.

``training_config.fsdp: true`` under torchrun shards the frozen base with PyTorch's FSDP2
(``fully_shard``): one unit per decoder layer plus the root (embeddings, final norm, LM head),
each all-gathered just for its forward and backward, so a device holds 1/N of the base plus
one layer at a time. The LoRA factors are left out of FSDP (``ignored_params``): they are
under 1% of the weights, so every rank keeps all of them, and checkpoints, the optimizer and
``save_adapter`` see plain tensors exactly as in a DDP run. Their gradients are averaged over
ranks in one all-reduce at the end of each synchronising backward, as DDP would.

Works with NCCL on GPUs and with gloo on CPU (tested: 2 gloo processes give the DDP result).
``fully_shard`` moves each unit to the device as it shards it, so a base loaded on the CPU
reaches the GPU one layer at a time; a base loaded on the GPU must fit there whole first. Not
with a 4-bit base: bitsandbytes' packed weights and quantization states are not FSDP-shardable
here; use DDP for QLoRA.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from ..core.errors import PhiloraError
from ..model.families import is_4bit

FSDP_QUANT_ERROR = ("training_config.fsdp does not work with model.quantization (a 4-bit base); "
                    "set training_config.fsdp: false (DDP) for QLoRA")


def _layer_classes(model: nn.Module) -> set:
    """Class names of the blocks to shard one by one (transformers' ``_no_split_modules``)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


class FSDPLoRA(nn.Module):
    """``module`` with its frozen parameters sharded by FSDP2 and its trainable ones replicated.

    Same surface as DistributedDataParallel for the training loop: call it, ``no_sync()``.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if any(is_4bit(m) for m in module.modules()):
            raise PhiloraError(FSDP_QUANT_ERROR)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        ignored = set(self.trainable)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        blocks = _layer_classes(module)
        for m in list(module.modules()):
            if type(m).__name__ in blocks:
                fully_shard(m, mesh=mesh, ignored_params=ignored)
        self.module = fully_shard(module, mesh=mesh, ignored_params=ignored)
        for p in self.trainable:
            p.data = p.data.to(device)
        # Trainable tensors are replicated: make every rank start from rank 0's values.
        with torch.no_grad():
            for p in self.trainable:
                dist.broadcast(p.data, src=0)
        self._sync, self._queued = True, False
        for p in self.trainable:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (no all-reduce) inside this context, as DDP's."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, _param) -> None:
        if self._sync and not self._queued:  # once per backward, after every gradient is in
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _all_reduce(self) -> None:
        self._queued = False
        grads = []
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        at = 0
        for g in grads:
            g.copy_(flat[at:at + g.numel()].view_as(g))
            at += g.numel()

