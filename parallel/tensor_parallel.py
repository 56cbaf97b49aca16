"""Tensor parallelism with Megatron-style sequence parallelism, from torch DTensor's parallel styles.

Over the mesh's "tp" axis (torchtitan's plan for a Llama-style block):
- projections into the heads and into the feed-forward (wq, wk, wv, w_gate, w_up) are column-parallel: each
  rank computes its own heads (query and KV heads alike, so GQA keeps whole groups on a rank) and its slice of
  the feed-forward width;
- projections out of them (wo, w_down) are row-parallel, their partial sums reduce-scattered along the sequence;
- norms and residual adds run sequence-parallel: each rank holds [B, S/tp, hidden] between blocks, and the
  all-gather to the full sequence happens at the entry of attention and of the feed-forward;
- the embedding is split over the vocabulary (its output leaves sequence-sharded); the output head over the
  vocabulary too, its logits gathered so the loss sees [B, S, V] on every tensor rank.
Modules hand plain local tensors to each other (`use_local_output`), so the block code, context-parallel
attention, recomputation and int8 storage see ordinary tensors; parameters are DTensors, which is what FSDP2
and torch.distributed.checkpoint build on.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from parallel.transforms import mark_applied

# The module inputs that carry activations; RoPE tables (attention's cos and sin) are local, full-sequence.
_GATHER_ACTIVATION = {"input_layouts": (Shard(1), None, None), "desired_input_layouts": (Replicate(), None, None)}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model`'s parameters over `tp_mesh` in place; activations between blocks become [B, S/tp, hidden]."""
    mark_applied(model, "tensor parallelism")
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(use_local_output=True),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn_norm": SequenceParallel(use_local_output=True),
            "attn": PrepareModuleInput(**_GATHER_ACTIVATION, use_local_output=True),
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(use_local_output=True),
            "ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                      use_local_output=True),
            "ffn.w_gate": ColwiseParallel(),
            "ffn.w_up": ColwiseParallel(),
            "ffn.w_down": RowwiseParallel(output_layouts=Shard(1)),
        })
