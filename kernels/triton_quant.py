"""Triton int8 quantize / dequantize for saved activations: bit-identical twins of kernels.quant's torch path.

One program per BLOCK of the flat, contiguous tensor. An element's group is (flat index // span) % G, so any
channel_dim and any grouping is the same 1-D kernel; the per-group scale / shift are gathered (G floats, cached).
The stochastic-rounding bits hash (key, flat index) with the same uint32 mixer as
kernels.quant_common.uniform_from_index.

Bit equality with the torch path rests on three choices: the reciprocal scale is computed once by torch (Triton's
fp32 division is approximate); rounding compares u with frac instead of adding them; and the kernels are built
with enable_fp_fusion=False, so dequantize's q * scale + shift is not contracted into an FMA (torch rounds twice).

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.quant_common import prepare_dequantize, prepare_quantize

BLOCK = 1024
# Flat indices stay int32 (cheaper division) while the last program's offsets fit; tests lower it to force the
# int64 path on tiny tensors.
INDEX32_LIMIT = 2**31 - 1


@triton.jit
def _mix(h):
    # uint32 -> uint32; the same rounds as kernels.quant_common._mix (uint32 multiplies wrap mod 2**32 here).
    h ^= h >> 15
    h *= 0x2C1B3C6D
    h ^= h >> 12
    h *= 0x297A2D39
    h ^= h >> 15
    return h


@triton.jit
def _uniform(offs, key, IDX64: tl.constexpr):
    # offs: flat element indices (int32, or int64 when IDX64); key: uint32 -> float32 u in [0, 1).
    h = _mix(offs.to(tl.uint32) ^ key)
    if IDX64:
        h ^= (offs >> 32).to(tl.uint32)
    h = _mix(h)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _offsets(n, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit(do_not_specialize=["key_bits"])
def _quantize_kernel(X, Q, InvScale, Shift, n, span, num_groups, key_bits,
                     STOCHASTIC: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, IDX64)
    group = offs // span % num_groups
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    inv_scale = tl.load(InvScale + group, mask=mask, other=1.0)
    shift = tl.load(Shift + group, mask=mask, other=0.0)
    v = (x - shift) * inv_scale
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    floor = tl.floor(v)
    frac = v - floor
    # Same rule as the torch twin: up with probability frac (stochastic), or half-up to nearest.
    up = frac >= 0.5
    if STOCHASTIC:
        up = _uniform(offs, key_bits.to(tl.uint32, bitcast=True), IDX64) < frac
    tl.store(Q + offs, (floor + up.to(tl.float32)).to(tl.int8), mask=mask)


@triton.jit
def _dequantize_kernel(Q, Out, Scale, Shift, n, span, num_groups,
                       BF16_BY_HAND: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK, IDX64)
    group = offs // span % num_groups
    q = tl.load(Q + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(Scale + group, mask=mask, other=0.0)
    shift = tl.load(Shift + group, mask=mask, other=0.0)
    out = q * scale + shift
    if BF16_BY_HAND:
        # The interpreter truncates fp32 -> bf16 (compiled code and torch round to nearest even): round the bits
        # by hand. out is finite for finite scale and shift, so no NaN payload can carry into inf.
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)


def _interpreted() -> bool:
    # triton.jit picks interpreter or compiler when this module is imported; the kernel's type records which.
    return not isinstance(_quantize_kernel, JITFunction)


def _check_device(t: Tensor, name: str) -> None:
    if not t.is_cuda and not _interpreted():
        raise ValueError(
            f"triton {name} got {t.device} tensors: it needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels.triton_quant is imported (CPU interpreter, small shapes only); use backend='torch' otherwise"
        )


def _launch(n: int) -> dict:
    return {"grid": (triton.cdiv(n, BLOCK),), "IDX64": n + BLOCK > INDEX32_LIMIT}


def triton_quantize_int8(
    x: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, seed: int, stochastic: bool = True
) -> Tensor:
    """x: float [..., C (at channel_dim), ...]; scale, shift: float32 [G] -> int8 codes, x's shape, contiguous.

    See kernels.quant.quantize_int8. A non-contiguous x is copied to contiguous first.
    """
    span, inv_scale, shift, key = prepare_quantize(x, scale, shift, channel_dim, seed)
    _check_device(x, "quantize_int8")
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    n = x.numel()
    if n == 0:
        return q
    launch = _launch(n)
    # The uint32 key travels as the int32 with the same bits (Python ints >= 2**31 would arrive as int64).
    key_bits = key - 2**32 if key >= 2**31 else key
    _quantize_kernel[launch["grid"]](
        x, q, inv_scale, shift, n, span, scale.shape[0], key_bits,
        STOCHASTIC=stochastic, IDX64=launch["IDX64"], BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False,
    )
    return q


def triton_dequantize_int8(q: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, dtype: torch.dtype) -> Tensor:
    """q: int8 [..., C (at channel_dim), ...]; scale, shift: float32 [G] -> dtype, q's shape, contiguous.

    See kernels.quant.dequantize_int8.
    """
    span, scale, shift = prepare_dequantize(q, scale, shift, channel_dim, dtype)
    _check_device(q, "dequantize_int8")
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    if n == 0:
        return out
    launch = _launch(n)
    _dequantize_kernel[launch["grid"]](
        q, out, scale, shift, n, span, scale.shape[0], BF16_BY_HAND=dtype == torch.bfloat16 and _interpreted(),
        IDX64=launch["IDX64"], BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False,
    )
    return out
