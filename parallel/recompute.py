"""Activation recomputation per block: `none`, `selective` (Megatron-style), or `full`.

- full: a block keeps only its inputs; its whole forward, context-parallel attention included (so ring K/V
  travel again), runs a second time during backward.
- selective: a block keeps its matmul outputs and its attention's own saved tensors (out and lse, q and the
  K/V block for ring attention) and recomputes only the cheap elementwise parts (norms, RoPE, SiLU, products,
  residual adds). Attention is never run again: its output is replayed from the forward, so a recompute never
  repeats ring or Ulysses communication.

Built on torch's non-reentrant checkpoint with a selective-checkpoint policy. Attention runs inside the
checkpointed region but outside its bookkeeping: saved-tensor hooks restored to plain saving, no caching by
the policy, and its output remembered for the replay.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from parallel.config import RecomputeConfig

# Matmul outputs are kept: recomputing them would cost as much as the forward's matmuls.
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default}


class _ReplayedAttention:
    """Wraps a block's attn_fn: runs it normally in forward and hands back the same output when the
    checkpoint recomputes the block during backward (detected by running inside the autograd engine)."""

    def __init__(self, attn_fn: Callable[..., Tensor]):
        self.attn_fn = attn_fn
        self.outputs: deque[Tensor] = deque()
        self.running = False  # the selective policy leaves ops inside attention alone

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if torch._C._current_graph_task_id() != -1:
            return self.outputs.popleft()
        self.running = True
        try:
            # Plain saving for attention's own tensors: they live until backward, not recomputed.
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                out = self.attn_fn(*args, **kwargs)
        finally:
            self.running = False
        if torch.is_grad_enabled():
            self.outputs.append(out)
        return out


def _selective_policy(attention: _ReplayedAttention) -> Callable:
    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if not attention.running and op in _MATMULS:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpointed(forward: Callable[..., Tensor], context_fn: Callable | None) -> Callable[..., Tensor]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        options = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return run


def apply_recompute(model: nn.Module, cfg: RecomputeConfig) -> None:
    """Make the selected blocks of `model.blocks` recompute in backward, in place."""
    if cfg.mode == "none":
        return
    blocks = list(model.blocks)
    for index in cfg.selected(len(blocks)):
        block = blocks[index]
        context_fn = None
        if cfg.mode == "selective":
            attention = _ReplayedAttention(block.attn.attn_fn)
            block.attn.attn_fn = attention
            context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy(attention))
        block.forward = _checkpointed(block.forward, context_fn)
