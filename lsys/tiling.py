"""Sequence-tiled computation: a position-wise function of [B, S, ...] run a chunk of positions at a time, in
forward AND backward, so only one chunk's intermediates exist at once (ALST's TiledMLP, Arctic Long Sequence
Training). For the feed-forward, whose [B, S, ffn_hidden] gate, up, SiLU and product tensors are several times
the size of its [B, S, hidden] input and output.

The whole region stores only its input: forward runs each chunk without building a graph; backward runs each
chunk again from its slice of the input and takes that chunk's input and parameter gradients at once, summing
the parameters' over chunks. Gradients are exact: every position is computed as in the untiled function, only
the parameter gradients' sum is split by chunk.

Why not DeepSpeed's `TiledMLP` (deepspeed.runtime.sequence_parallel.ulysses_sp), which does the same: its
backward adds the parameters' gradients to `.grad` from a nested `torch.autograd.backward`, outside the graph
(with `ds_grad_is_ready` flags for ZeRO), so `torch.autograd.grad` callers and anything that watches the graph's
gradient edges do not see them; here they are returned as the gradients of the function's inputs. It also
recomputes without the forward's autocast (bf16 compute would be recomputed in fp32: other gradients), and
takes a chunk count rather than a chunk length (torch.chunk's pieces).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kernels.slabs import worked_slabs
from parallel._compat import FakeTensor


def _pieces(length: int, chunk_tokens: int, x: Tensor) -> list[tuple[int, int]]:
    """(start, stop) of each chunk; traced on fake tensors only the chunks whose allocations differ
    (kernels/slabs.py)."""
    starts = worked_slabs(length, chunk_tokens, isinstance(x, FakeTensor))
    return [(start, min(start + chunk_tokens, length)) for start in starts]


class _SequenceTiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], chunk_tokens: int, x: Tensor, *params: Tensor) -> Tensor:
        # x: [B, S, ...] -> fn's output [B, S, ...], a chunk of positions at a time (no graph: grad mode is off)
        device = x.device.type
        ctx.fn, ctx.chunk_tokens = fn, chunk_tokens
        # Python references, not saved tensors: recomputation's checkpoints would hand back detached copies.
        ctx.params = params
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device), cache_enabled=torch.is_autocast_cache_enabled())
        ctx.save_for_backward(x)  # first, so a recomputing checkpoint can stop here (its last saved tensor)
        return _tiled(fn, x, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # grad_out: [B, S, ...] like the output -> the gradients of x and of every parameter
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        wanted = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if needed]
        sums: list[Tensor | None] = [None] * len(wanted)
        for start, stop in _pieces(x.shape[1], ctx.chunk_tokens, x):
            piece = x[:, start:stop].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.fn(piece)  # [B, chunk, ...]: this chunk's intermediates, freed with its graph below
            inputs = ([piece] if grad_x is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, grad_out[:, start:stop])
            if grad_x is not None:
                grad_x[:, start:stop] = grads[0]
                grads = grads[1:]
            # In place: one chunk's gradients at a time on top of the sums (DeepSpeed's adds into .grad alike).
            sums = [g if s is None else s.add_(g) for s, g in zip(sums, grads, strict=True)]
            del out, grads  # before the next chunk's recompute, not after it
        param_grads = iter(sums)
        return (None, None, grad_x, *(next(param_grads) if needed else None for needed in ctx.needs_input_grad[3:]))


def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, chunk_tokens: int) -> Tensor:
    out = None
    for start, stop in _pieces(x.shape[1], chunk_tokens, x):
        piece = fn(x[:, start:stop])
        if out is None:  # the output's width and dtype are fn's (autocast, tensor-parallel partial sums)
            out = piece.new_empty((x.shape[0], x.shape[1], *piece.shape[2:]))
        out[:, start:stop] = piece
    return out


def sequence_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, chunk_tokens: int, params: Sequence[Tensor]) -> Tensor:
    """fn(x) for a position-wise `fn` of x [B, S, ...] (its output at a position depends only on x there) that
    reads `params`, computed `chunk_tokens` positions at a time in forward and backward; only x is stored for
    backward. `fn` must be deterministic (it runs again in backward). 0, or a chunk covering S: fn(x) as is."""
    if chunk_tokens <= 0 or chunk_tokens >= x.shape[1]:
        return fn(x)
    if not torch.is_grad_enabled():
        return _tiled(fn, x, chunk_tokens)
    return _SequenceTiled.apply(fn, chunk_tokens, x, *params)
