"""`parallelize(model, cfg, mesh)`: the one place where parallelism is applied to a plain model.

Fixed order (each later step wraps what the earlier ones produced):
  1. context-parallel attention: every block's `attn.attn_fn` becomes ring / Ulysses / hybrid attention
     over the mesh's groups;
  2. 8-bit stored activations: saved-tensor hooks around the parts of each block the policy names,
     attention included (so it wraps the attention chosen in step 1);
  3. recomputation: selected blocks checkpoint their forward (selective mode replays attention's output
     instead of running it again, so it wraps the attention of steps 1 and 2);
  4. data parallelism over the replica group (dp x cp), gradients summed.
Each transform marks the model and refuses to run twice.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from parallel.config import ParallelConfig, QuantConfig, RecomputeConfig
from parallel.data_parallel import replicate
from parallel.mesh import MeshInfo
from parallel.quantize import apply_activation_quantization
from parallel.recompute import apply_recompute

_APPLIED = "_lsys_parallelized"


def apply_context_parallel(model: nn.Module, cfg: ParallelConfig, mesh: MeshInfo) -> None:
    """Swap every block's attention function for context-parallel attention over the mesh's CP groups."""
    if mesh.cp_size == 1:
        return
    from parallel.context import attention as cp_attention

    attn_fn = functools.partial(
        cp_attention, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, layout=cfg.cp_layout
    )
    for block in model.blocks:
        block.attn.attn_fn = attn_fn


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    mesh: MeshInfo,
    device: torch.device,
    recompute: RecomputeConfig | None = None,
    quant: QuantConfig | None = None,
) -> nn.Module:
    """model: a plain model following the block protocol -> the model to train (possibly wrapped)."""
    if getattr(model, _APPLIED, False):
        raise ValueError("parallelize() was already applied to this model; build a fresh model instead")
    recompute = recompute or RecomputeConfig()
    apply_context_parallel(model, cfg, mesh)
    apply_activation_quantization(model, quant or QuantConfig(), recompute)
    apply_recompute(model, recompute)
    setattr(model, _APPLIED, True)
    if mesh.replica_size > 1:
        model = replicate(model, mesh.replica_group, device)
    return model
