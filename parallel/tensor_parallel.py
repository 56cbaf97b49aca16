"""Tensor parallelism with Megatron-style sequence parallelism, from torch DTensor's parallel styles.

Over the mesh's "tp" axis, each module as the model's plan (parallel.plan) splits it; for a Llama-style block
(torchtitan's plan):
- projections into the heads and into the feed-forward are column-parallel (COLWISE): each rank computes its
  own heads (query and KV heads alike, so GQA keeps whole groups on a rank) and its slice of the feed-forward
  width;
- projections out of them are row-parallel (ROWWISE), their partial sums reduce-scattered along the sequence;
  a feed-forward tiled along the sequence (lsys.tiling) leaves its down projection's sums partial
  (ROWWISE_PARTIAL) and reduce-scatters its whole output once on the way out;
- per-head norms (Qwen3's q/k norms) run on this rank's heads (HEADS), their weights replicated;
- norms and residual adds run sequence-parallel (SEQUENCE): each rank holds [B, S/tp, hidden] between blocks,
  and the all-gather to the full sequence happens at the entry of attention and of the feed-forward
  (GATHER_INPUT);
- the embedding is split over the vocabulary (its output leaves sequence-sharded); the output head over the
  vocabulary too, its logits gathered so the loss sees [B, S, V] on every tensor rank.
Modules hand plain local tensors to each other (`use_local_output`), so the block code, context-parallel
attention, recomputation and int8 storage see ordinary tensors; parameters are DTensors, which is what FSDP2
and torch.distributed.checkpoint build on.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from parallel.plan import ParallelPlan, Split, TensorSplit
from parallel.transforms import mark_applied


def _style(entry: TensorSplit) -> ParallelStyle:
    """The DTensor style of one plan entry; modules hand plain local tensors to each other."""
    if entry.split is Split.COLWISE:
        return ColwiseParallel()
    if entry.split is Split.ROWWISE:
        return RowwiseParallel(output_layouts=Shard(1))
    if entry.split is Split.ROWWISE_PARTIAL:
        return RowwiseParallel(output_layouts=Partial())
    if entry.split is Split.SEQUENCE:
        return SequenceParallel(use_local_output=True)
    if entry.split is Split.HEADS:
        return SequenceParallel(sequence_dim=2, use_local_output=True)
    if entry.split is Split.GATHER_INPUT:
        # Only the first input is an activation; the rest (attention's RoPE tables) are local, full-sequence.
        rest = (None,) * (entry.inputs - 1)
        if entry.reduce_output:
            return PrepareModuleInputOutput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
                                            use_local_input=True, output_layouts=Partial(),
                                            desired_output_layouts=Shard(1), use_local_output=True)
        return PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest),
                                  use_local_output=True)
    if entry.split is Split.VOCAB_EMBEDDING:
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if entry.split is Split.VOCAB_HEAD:
        return ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    raise ValueError(f"no tensor-parallel style for {entry.split}")


def _styles(entries: Mapping[str, TensorSplit]) -> dict[str, ParallelStyle]:
    return {path: _style(entry) for path, entry in entries.items()}


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """Shard `model`'s parameters over `tp_mesh` in place, as `plan` splits its modules; activations between
    blocks become [B, S/tp, hidden]."""
    mark_applied(model, "tensor parallelism")
    parallelize_module(model, tp_mesh, _styles(plan.tensor_parallel))
    for block in plan.blocks:
        parallelize_module(block.block, tp_mesh, _styles(block.tensor_parallel))
