"""torch's fused attention ops as block kernels: forward returns (out, lse), backward takes a global out and lse.

These are private aten ops (the ones `F.scaled_dot_product_attention` dispatches to), fenced in this module;
tested with torch 2.13: the CPU op's numerics, and the CUDA ops' calls against their meta kernels (their numerics
are bench/gpu_check.py's to check on a GPU). torch's own ring attention
(torch.distributed.tensor.experimental) calls them the same way. Every kernel here takes q, k, v as
[B, S, H, D] with equal head counts (kernels.attention expands grouped K/V first) and hands the ops
[B, H, S, D] views, as SDPA does.

  aten       CPU flash attention, any float dtype.
  flash      FlashAttention-2 (CUDA, sm80+), fp16/bf16, head_dim <= 256.
  efficient  memory-efficient attention (CUDA), fp32 too; its lse is padded to a multiple of 32 rows.
  cudnn      cuDNN attention (CUDA), fp16/bf16, head_dim <= 128; its lse is [B, H, Sq, 1].

Causal masks are top-left aligned (query i sees keys 0..i) everywhere in lsys. flash (and, we do not rely on
the difference, cudnn) align a causal mask bottom-right when Sq != Sk, so those two take causal blocks only
when square; lsys's causal blocks always are (a ring's diagonal block, Ulysses' and one device's sequence).
Dropout is never used, so the random-state arguments of the backward ops are placeholders they do not read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten
HALF = frozenset({torch.float16, torch.bfloat16})
EFFICIENT_LSE_ROWS = 32  # the memory-efficient op pads its lse to a multiple of this many query rows


def _swap(*tensors: Tensor) -> tuple[Tensor, ...]:
    # [B, S, H, D] <-> [B, H, S, D] views, both ways: unit stride along D stays, as the fused ops need.
    return tuple(t.transpose(1, 2) for t in tensors)


# --- aten: CPU ---------------------------------------------------------------------------------------------------

def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(*_swap(q, k, v), 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _cpu_backward(dout, q, k, v, out, lse, causal, scale):
    return _swap(*aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_swap(dout, q, k, v, out), lse, 0.0, causal, scale=scale))


# --- flash: CUDA, 16-bit ------------------------------------------------------------------------------------------

def _flash_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_flash_attention(*_swap(q, k, v), 0.0, causal, False, scale=scale)
    return out.transpose(1, 2), lse


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    # No cumulative sequence lengths (not varlen); the random state (rng_state [2], unused []) only feeds dropout.
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    return _swap(*aten._scaled_dot_product_flash_attention_backward(
        *_swap(dout, q, k, v, out), lse.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, causal,
        seed, offset, scale=scale))


# --- efficient: CUDA, any of fp16/bf16/fp32 -----------------------------------------------------------------------

def _efficient_forward(q, k, v, causal, scale):
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(*_swap(q, k, v), None, True, 0.0, causal,
                                                                 scale=scale)
    return out.transpose(1, 2), lse.narrow(2, 0, q.shape[1])


def _efficient_backward(dout, q, k, v, out, lse, causal, scale):
    rows = q.shape[1]
    # The padding rows belong to no query: never read.
    padded = F.pad(lse, (0, math.ceil(rows / EFFICIENT_LSE_ROWS) * EFFICIENT_LSE_ROWS - rows))
    seed = offset = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        *_swap(dout, q, k, v), None, out.transpose(1, 2), padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale)
    return _swap(dq, dk, dv)


# --- cudnn: CUDA, 16-bit ------------------------------------------------------------------------------------------

def _cudnn_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(*_swap(q, k, v), None, True, 0.0, causal, False,
                                                           scale=scale)
    return out.transpose(1, 2), lse.view(lse.shape[:3])  # [B, H, Sq, 1] -> [B, H, Sq]


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    seed = offset = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
        *_swap(dout, q, k, v, out), lse.contiguous().unsqueeze(-1), seed, offset, None, None, None,
        q.shape[1], k.shape[1], 0.0, causal, scale=scale)
    return _swap(dq, dk, dv)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class TorchKernel:
    """One fused op pair and what it accepts."""

    cuda: bool
    dtypes: frozenset
    max_head_dim: int
    square_causal_only: bool
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Tensor, ...]]
    min_capability: tuple[int, int] = (0, 0)

    def unsupported(self, q: Tensor, k: Tensor, causal: bool) -> str | None:
        """Why this kernel cannot run q [B, Sq, H, D] against k [B, Sk, H, D] (None: it can)."""
        head_dim = q.shape[3]
        if q.is_cuda != self.cuda:
            return f"it runs on {'CUDA' if self.cuda else 'CPU'} tensors, got {q.device}"
        if q.dtype not in self.dtypes:
            return f"it takes {', '.join(sorted(str(d) for d in self.dtypes))}, got {q.dtype}"
        alignment = 4 if q.dtype == torch.float32 else 8
        if self.cuda and (head_dim > self.max_head_dim or head_dim % alignment):
            return f"it takes head_dim <= {self.max_head_dim} and a multiple of {alignment}, got {head_dim}"
        if causal and self.square_causal_only and q.shape[1] != k.shape[1]:
            return f"its causal mask is aligned bottom-right: causal blocks must be square, got {q.shape[1]}x" \
                f"{k.shape[1]}"
        if self.cuda and _capability(q.device) < self.min_capability:
            return f"it needs compute capability {self.min_capability}, got {_capability(q.device)}"
        return None


ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
TORCH_KERNELS = {
    "aten": TorchKernel(False, ALL_FLOATS, 1 << 30, False, _cpu_forward, _cpu_backward),
    "flash": TorchKernel(True, HALF, 256, True, _flash_forward, _flash_backward, (8, 0)),
    "efficient": TorchKernel(True, HALF | {torch.float32}, 1 << 30, False, _efficient_forward,
                             _efficient_backward, (5, 0)),
    "cudnn": TorchKernel(True, HALF, 128, True, _cudnn_forward, _cudnn_backward, (8, 0)),
}
