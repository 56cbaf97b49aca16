"""What a model tells the parallel layer about itself: `model.parallel_plan() -> ParallelPlan`.

The transforms of `parallelize()` never name a model's attributes; they read the modules and roles a plan
gives them, so another model family brings its own plan and the parallel layer stays as it is. A plan holds
the model's own module objects (transforms wrap them in place), taken once before any transform runs.

The model's side of the contract, beyond the plan:
- each block's attention module has an `attn_fn(q, k, v, causal=..., document_ids=...)` attribute that
  transforms replace (context-parallel attention, int8 storage, selective recompute's replay), on
  [B, S, heads, head_dim] (document ids [B, S], or None: plain causal);
- attention and feed-forward modules take the normalised activation [B, S, hidden] as their first input and
  return [B, S, hidden]; a block maps [B, S, hidden] to [B, S, hidden] (plus any further, local inputs);
- positions are explicit global ids, so a rank holding a shard of the sequence computes what the full
  sequence would at those positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from torch import nn


class Split(Enum):
    """How tensor parallelism splits one module (parallel.tensor_parallel turns each into a DTensor style)."""

    COLWISE = "colwise"  # output features split: each rank computes its heads / its slice of the width
    ROWWISE = "rowwise"  # input features split; partial sums reduce-scattered along the sequence
    # Input features split, partial sums left as they are: a module that calls it piecewise along the sequence
    # reduces its own output once (GATHER_INPUT with reduce_output).
    ROWWISE_PARTIAL = "rowwise_partial"
    SEQUENCE = "sequence"  # runs on this rank's [B, S/tp, hidden] (norms)
    # Runs on this rank's heads [B, S, heads/tp, head_dim] (per-head norms): parameters replicated, their
    # gradients summed over the tensor ranks.
    HEADS = "heads"
    GATHER_INPUT = "gather_input"  # its first input is all-gathered along the sequence; further inputs are local
    VOCAB_EMBEDDING = "vocab_embedding"  # token embedding split over the vocabulary, output sequence-sharded
    VOCAB_HEAD = "vocab_head"  # output head split over the vocabulary, its logits gathered on every rank


@dataclass(frozen=True)
class TensorSplit:
    """One entry of a tensor-parallel plan. `inputs`: how many positional inputs the module takes (only
    GATHER_INPUT needs it: the layouts of every input are declared). `reduce_output` (GATHER_INPUT only): its
    output is the tensor ranks' partial sums (of a ROWWISE_PARTIAL inside), reduce-scattered along the sequence
    on the way out."""

    split: Split
    inputs: int = 1
    reduce_output: bool = False


@dataclass(frozen=True)
class BlockPlan:
    """One repeated block and the modules inside it that transforms treat specially."""

    block: nn.Module
    attention: nn.Module  # owns the replaceable `attn_fn`; its first input is the normalised activation
    feed_forward: nn.Module  # first input: the normalised activation
    norms: tuple[nn.Module, ...]  # what int8 storage's kind "norm" covers
    # Feeds only the residual add: selective recompute keeps no copy of its output (the recompute stops first).
    final_projection: nn.Module
    tensor_parallel: Mapping[str, TensorSplit]  # module paths relative to `block`
    # Whether backward reads the q/k/v projections' outputs (e.g. per-head norms between them and attention).
    # When it does not (only RoPE, whose backward needs its tables alone, lies between), selective recompute
    # stores no copy of them.
    projections_read_in_backward: bool = False


@dataclass(frozen=True)
class ParallelPlan:
    blocks: tuple[BlockPlan, ...]  # in forward order: recompute selection and FSDP units count them so
    tensor_parallel: Mapping[str, TensorSplit]  # module paths relative to the model, outside the blocks
    attention_backend: str = "auto"  # the block kernel (kernels.attention) context-parallel attention calls

    def block_modules(self) -> list[nn.Module]:
        return [plan.block for plan in self.blocks]
