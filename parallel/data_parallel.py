"""Data parallelism over every rank that holds the same parameters (dp x cp).

Gradients are SUMMED, not averaged: the training loss is already divided by the global token count, so
the sum over replicas is the exact gradient of the global mean loss whatever the split of tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _sum_allreduce_hook(group, bucket):
    # Unannotated on purpose: DDP inspects the `bucket` annotation and rejects the string form that
    # `from __future__ import annotations` produces. group: dist.ProcessGroup; bucket: dist.GradBucket.
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def replicate(model: nn.Module, group: dist.ProcessGroup, device: torch.device) -> nn.Module:
    """Wrap in DDP (bucketed all-reduce overlapped with backward) with summed gradients over `group`."""
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
    )
    ddp.register_comm_hook(group, _sum_allreduce_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under any data-parallel wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model
