"""Sharded data parallelism (FSDP2 `fully_shard`) over every rank that holds the same parameters (dp x cp).

Context-parallel ranks hold the same parameters as data-parallel ones and need the same gradient sum, so they
share one flattened "replica" mesh axis: parameters, gradients and optimizer state are sharded over all of them.
With tensor parallelism the parameters are already DTensors on the "tp" axis; FSDP2 shards them again over the
replica axis of the same mesh (2-D: replica x tp).

Gradients are SUMMED, not averaged (divide factor 1): the training loss is already divided by the global
token count, so the sum over replicas is the exact gradient of the global mean loss whatever the split.
Each block is its own FSDP unit (its parameters all-gathered just before its forward and again before its
backward, freed after), then the root takes the embedding, final norm and output head. With `min_unit_params`
consecutive blocks share a unit until they hold that many parameters, and blocks left below it join the root,
whose parameters stay gathered from forward to the end of backward: every unit costs two all-gathers and a
reduce-scatter per step, each a rendezvous of all replicas, which dominates a small model's step on CPU ranks.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from parallel.transforms import mark_applied


def block_units(blocks: list[nn.Module], min_unit_params: int) -> list[list[nn.Module]]:
    """Consecutive runs of `blocks` holding at least `min_unit_params` parameters each (full sizes, not shards);
    a trailing run below it is left out (the root takes it). 0: one run per block."""
    units, run, held = [], [], 0
    for block in blocks:
        run.append(block)
        held += sum(p.numel() for p in block.parameters())
        if held >= min_unit_params:
            units.append(run)
            run, held = [], 0
    return units


def shard_data_parallel(model: nn.Module, blocks: list[nn.Module], replica_mesh: DeviceMesh,
                        min_unit_params: int = 0, offload: str = "none", compute_dtype: torch.dtype | None = None,
                        ) -> None:
    """Shard `model` (units of its `blocks`, then the root) over `replica_mesh`, in place (see `block_units`).
    `offload` "cpu": the shards and their gradients stay in host memory (pinned on CUDA); each unit's parameters
    are copied to the device for its forward and backward, and its gradients back after the reduce-scatter.
    `compute_dtype` below the parameters' (bf16 of fp32 parameters): the shards are cast before the all-gather,
    which then moves half the bytes and leaves autocast no gathered weight to cast in every forward; gradients
    are reduce-scattered in the parameters' dtype."""
    mark_applied(model, "data parallelism")
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload == "cpu" else OffloadPolicy()
    param_dtype = next(model.parameters()).dtype
    mixed = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=param_dtype)
             if compute_dtype is not None and compute_dtype != param_dtype else MixedPrecisionPolicy())
    # The root returns the logits, a view when tensor parallelism hands back its local shard; FSDP2 warns in
    # case the caller modifies it in place, which the trainer never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    # The global gradient norm over replica x tp DTensors is reduced over both axes in two steps, one scalar
    # each; DTensor logs that as a performance hint on every rank at every step.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    for unit in block_units(blocks, min_unit_params):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=replica_mesh, offload_policy=policy, mp_policy=mixed)
    fully_shard(model, mesh=replica_mesh, offload_policy=policy, mp_policy=mixed)
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
