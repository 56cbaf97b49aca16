"""RMSNorm that keeps only its input and one statistic per row, and never holds a whole fp32 copy of a long sequence.

    y = x / sqrt(mean(x^2) + eps) * w        (computed in at least fp32, returned in x's dtype)

Written as autograd ops, a bf16 norm of a [S, h] sequence keeps its fp32 upcast and normalised copy for backward
and makes several more fp32 [S, h] tensors in backward: at long context those were the largest temporaries of a
recomputed block's backward (`lsys plan` of the 8B model at 3.3M tokens on 8 ranks). Here forward and backward run
a slab of rows at a time in fp32 and save the input (its own dtype) and the per-row reciprocal RMS, the way fused
kernels (Apex, Liger) do (a slab of SLAB_BYTES in fp32; on a GPU its size keeps each operation large):

    r = 1 / sqrt(mean(x^2) + eps),  n = x r
    dw = sum over rows of dy * n,  dx = r (dy w - n mean(dy w n))

Traced on fake tensors (`lsys plan`), only the slabs whose allocations differ run (kernels/slabs.py).
Each row's forward is the same arithmetic as the plain formula (bit-identical); the backward is exact in float64
(tests/lsys/test_norm.py). Tensors that are not plain (DTensors of tensor/sequence parallelism) take the plain
autograd formula, whose sharding DTensor already handles.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from kernels.slabs import worked_slabs
from parallel._compat import FakeTensor

SLAB_BYTES = 256 * 2**20  # fp32 bytes per slab of rows: the only fp32 temporaries are a few slabs


def _rows_per_slab(width: int) -> int:
    return max(1, SLAB_BYTES // (4 * width))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., h], weight: [h] -> [..., h] in x's dtype."""
    if isinstance(x, DTensor) or isinstance(weight, DTensor):
        return _plain(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


def _plain(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in at least fp32: bf16 squares lose the small components that set the scale.
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(wide.dtype)).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], 1, dtype=wide, device=x.device)
        w, step = weight.to(wide), _rows_per_slab(x.shape[-1])
        for start in worked_slabs(rows.shape[0], step, isinstance(x, FakeTensor)):
            part = rows[start:start + step].to(wide)
            r = torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps)
            rstd[start:start + step] = r
            out[start:start + step] = (part * r * w).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        wide = rstd.dtype
        rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        dx = torch.empty_like(rows)
        dw = torch.zeros(x.shape[-1], dtype=wide, device=x.device)
        w, step = weight.to(wide), _rows_per_slab(x.shape[-1])
        for start in worked_slabs(rows.shape[0], step, isinstance(x, FakeTensor)):
            r = rstd[start:start + step]
            normed = rows[start:start + step].to(wide) * r
            dy = grads[start:start + step].to(wide)
            dw += (dy * normed).sum(0)
            dyw = dy * w
            dx[start:start + step] = (r * (dyw - normed * (dyw * normed).mean(-1, keepdim=True))).to(x.dtype)
        return dx.view_as(x), dw.to(weight.dtype), None
