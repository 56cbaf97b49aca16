"""Sharded data parallelism (FSDP2 `fully_shard`) over every rank that holds the same parameters (dp x cp).

Context-parallel ranks hold the same parameters as data-parallel ones and need the same gradient sum, so they
share one flattened "replica" mesh axis: parameters, gradients and optimizer state are sharded over all of them.
With tensor parallelism the parameters are already DTensors on the "tp" axis; FSDP2 shards them again over the
replica axis of the same mesh (2-D: replica x tp).

Gradients are SUMMED, not averaged (divide factor 1): the training loss is already divided by the global
token count, so the sum over replicas is the exact gradient of the global mean loss whatever the split.
Each block is its own FSDP unit (its parameters all-gathered just before its forward and again before its
backward, freed after), then the root takes the embedding, final norm and output head.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from parallel.transforms import mark_applied


def shard_data_parallel(model: nn.Module, replica_mesh: DeviceMesh) -> None:
    """Shard `model` (blocks, then the root) over `replica_mesh`, in place."""
    mark_applied(model, "data parallelism")
    # The root returns the logits, a view when tensor parallelism hands back its local shard; FSDP2 warns in
    # case the caller modifies it in place, which the trainer never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # The global gradient norm over replica x tp DTensors is reduced over both axes in two steps, one scalar
    # each; DTensor logs that as a performance hint on every rank at every step.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    for block in model.blocks:
        fully_shard(block, mesh=replica_mesh)
    fully_shard(model, mesh=replica_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM collective: fp32 would otherwise use PREMUL_SUM(1), which gloo lacks.
            module.set_force_sum_reduction_for_comms(True)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Micro-batches before the last keep their gradients local (no reduce-scatter) and accumulate."""
    if not isinstance(model, FSDPModule) or enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
