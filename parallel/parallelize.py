"""`parallelize(model, cfg, mesh)`: the one place where parallelism is applied to a plain model.

The model describes itself once, `model.parallel_plan()` (parallel.plan), before anything is wrapped; every
transform takes the plan's modules, and what one transform makes for a later one is handed over here
(the per-block host storages and int8 quantizers that recomputation keeps its tensors with).

Fixed order (each later step wraps what the earlier ones produced):
  1. tensor + sequence parallelism over the "tp" axis (parallel.tensor_parallel): parameters become DTensors,
     blocks exchange [B, S/tp, hidden] and attention sees this rank's heads;
  2. context-parallel attention: every block's attention's `attn_fn` becomes ring / Ulysses / hybrid attention
     over the mesh's groups (on the heads step 1 left to this rank);
  3. 8-bit stored activations: saved-tensor hooks around the parts of each block the policy names,
     attention included (so it wraps the attention chosen in step 2); with recompute.offload the recomputed
     blocks' payloads go to their host storage (parallel.offload, made just before);
  4. recomputation: selected blocks checkpoint their forward (selective mode replays attention's output
     instead of running it again, so it wraps the attention of steps 2 and 3), keeping what they keep in
     their host storage with recompute.offload;
  5. sharded data parallelism (FSDP2) over the replica axis (dp x cp), gradients summed; last, so that it
     shards the DTensors of step 1 and its per-block (or per-unit, `cfg.fsdp_unit_params`) all-gathers
     surround the checkpointed forwards.
Each transform marks the model and refuses to run twice.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from parallel.config import ParallelConfig, QuantConfig, RecomputeConfig
from parallel.data_parallel import shard_data_parallel
from parallel.mesh import MeshInfo
from parallel.offload import apply_offload
from parallel.plan import ParallelPlan
from parallel.quantize import apply_activation_quantization
from parallel.recompute import apply_recompute
from parallel.tensor_parallel import apply_tensor_parallel
from parallel.transforms import mark_applied


def apply_context_parallel(model: nn.Module, plan: ParallelPlan, cfg: ParallelConfig, mesh: MeshInfo) -> None:
    """Swap every block's attention function for context-parallel attention over the mesh's CP groups."""
    from parallel.context import attention as cp_attention
    from parallel.context import sharded_attention

    mark_applied(model, "context parallelism")
    groups = {"ring_group": mesh.ring_group, "ulysses_group": mesh.ulysses_group, "backend": plan.attention_backend}
    if cfg.cp_layout == "balanced":  # chosen per batch: it comes with the document ids (lsys.sharding)
        attn_fn = functools.partial(sharded_attention, **groups)
    else:
        attn_fn = functools.partial(cp_attention, **groups, layout=cfg.cp_layout)
    for block in plan.blocks:
        block.attention.attn_fn = attn_fn


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    mesh: MeshInfo,
    recompute: RecomputeConfig | None = None,
    quant: QuantConfig | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """model: a plain model with a `parallel_plan()` -> the same model, parallelized in place. `compute_dtype`:
    the dtype autocast computes in, when below the parameters' (FSDP2 then all-gathers in it)."""
    recompute, quant = recompute or RecomputeConfig(), quant or QuantConfig()
    # Asked of the model rather than passed in by the caller: the plan describes the model's own modules, and
    # every caller (trainer, memory planner) would only ever pass this.
    plan = model.parallel_plan()
    if mesh.tp_size > 1:
        apply_tensor_parallel(model, plan, mesh.tp_mesh)
    if mesh.cp_size > 1:
        apply_context_parallel(model, plan, cfg, mesh)
    storages = apply_offload(plan, recompute)
    quantizers = apply_activation_quantization(model, plan, quant, recompute, storages)
    apply_recompute(model, plan, recompute, quantizers, storages)
    if mesh.replica_size > 1 or cfg.fsdp_offload != "none":  # offloading the state needs FSDP2 on one rank too
        shard_data_parallel(model, plan.block_modules(), mesh.replica_mesh, cfg.fsdp_unit_params, cfg.fsdp_offload,
                            compute_dtype)
    return model
