"""What both int8 backends (kernels.quant's torch paths, kernels.triton_quant) must agree on, bit for bit.

The code range, the floor on scales, how a tensor's channel groups lie in its flat index, the argument checks, and
the counter-based hash behind stochastic rounding: a 32-bit key from the seed, then u from (key, flat index). The
Triton kernels carry twins of the hash; everything else here runs on the host before either backend starts.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

QMIN, QMAX = -128, 127
# Smallest scale used: the smallest normal fp32, whose reciprocal 2**126 is still finite. A zero scale (a constant
# group) would make 1/scale infinite and (x - shift) * inf NaN for x == shift; with the floor such a group
# quantizes to its shift, and any scale the caller computes from a real range is far above it.
SCALE_FLOOR = torch.finfo(torch.float32).tiny

_M32 = 0xFFFFFFFF
# Hash multipliers below 2**31: a 32-bit value times one stays below 2**63, so the torch path can do uint32
# arithmetic in int64 without ever overflowing (torch has no usable uint32 multiply).
_MIX_MUL = (0x2C1B3C6D, 0x297A2D39)
_GOLDEN = 0x9E3779B9
_U_SCALE = 2.0**-24  # 24 hash bits -> a float32 u in [0, 1), exactly representable


def _mix_int(h: int) -> int:
    # The 32-bit mixer of _mix for Python ints (host-side key derivation).
    h ^= h >> 15
    h = (h * _MIX_MUL[0]) & _M32
    h ^= h >> 12
    h = (h * _MIX_MUL[1]) & _M32
    return h ^ (h >> 15)


def _mix(h: Tensor) -> Tensor:
    # int64 tensor holding uint32 values -> the same. Shift-xor-multiply rounds; a bijection on 32 bits.
    h = h ^ (h >> 15)
    h = (h * _MIX_MUL[0]) & _M32
    h = h ^ (h >> 12)
    h = (h * _MIX_MUL[1]) & _M32
    return h ^ (h >> 15)


def stream_key(seed: int) -> int:
    """Any Python int (taken mod 2**64) -> the 32-bit key both backends hash element indices with."""
    s = operator.index(seed) & 0xFFFFFFFFFFFFFFFF
    return _mix_int(_mix_int((s >> 32) ^ _GOLDEN) ^ (s & _M32))


def uniform_from_index(idx: Tensor, key: int, *, below_2_32: bool = False) -> Tensor:
    """idx: int64 flat element indices (>= 0) -> float32 u in [0, 1), same shape. Twin of kernels.triton_quant._uniform.

    below_2_32=True promises every index is < 2**32 and skips folding in the (zero) high word.
    """
    h = _mix((idx if below_2_32 else idx & _M32) ^ key)
    if not below_2_32:
        h ^= idx >> 32
    return (_mix(h) >> 8).to(torch.float32) * _U_SCALE


def group_layout(shape: torch.Size, channel_dim: int, num_groups: int) -> tuple[int, int]:
    """-> (channel_dim normalised, span): a group's elements are runs of `span` consecutive flat indices."""
    if not -len(shape) <= channel_dim < len(shape):
        raise ValueError(f"channel_dim={channel_dim} is out of range for a tensor of shape {tuple(shape)}")
    channel_dim %= len(shape)
    channels = shape[channel_dim]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must divide the {channels} channels of dim {channel_dim} of shape "
            f"{tuple(shape)}; use a divisor (e.g. the number of heads, or 1 for one range per tensor)"
        )
    inner = 1
    for size in shape[channel_dim + 1 :]:
        inner *= size
    return channel_dim, channels // num_groups * inner


def _check_params(x: Tensor, scale: Tensor, shift: Tensor, channel_dim: int) -> tuple[int, Tensor, Tensor]:
    """Validate; -> (span, scale, shift) with scale floored at SCALE_FLOOR, both float32 [G] on x's device."""
    if scale.dim() != 1 or shift.shape != scale.shape:
        raise ValueError(
            f"scale and shift must be 1-D of equal length G; got scale {tuple(scale.shape)}, shift {tuple(shift.shape)}"
        )
    if scale.device != x.device or shift.device != x.device:
        raise ValueError(f"scale ({scale.device}) and shift ({shift.device}) must be on the tensor's {x.device}")
    _, span = group_layout(x.shape, channel_dim, scale.shape[0])
    # scale > 0 is the caller's promise (checking would sync the GPU); the floor only stops 0 from making NaN.
    return span, scale.float().clamp_min(SCALE_FLOOR), shift.float()


def prepare_quantize(x: Tensor, scale: Tensor, shift: Tensor, channel_dim: int, seed: int):
    """Shared by both backends: -> (span, inv_scale, shift, key). Multiplying by a reciprocal computed once here
    (instead of dividing) keeps the Triton path bit-identical: its fp32 division is approximate."""
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8 takes a floating-point tensor; got {x.dtype}")
    span, scale, shift = _check_params(x, scale, shift, channel_dim)
    return span, 1.0 / scale, shift, stream_key(seed)


def prepare_dequantize(q: Tensor, scale: Tensor, shift: Tensor, channel_dim: int, dtype: torch.dtype):
    if q.dtype != torch.int8:
        raise ValueError(f"dequantize_int8 takes the int8 codes from quantize_int8; got {q.dtype}")
    if not dtype.is_floating_point:
        raise ValueError(f"dequantize_int8 dtype={dtype} must be a floating-point dtype")
    return _check_params(q, scale, shift, channel_dim)
