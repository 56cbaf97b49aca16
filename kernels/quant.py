"""Mesa-style int8 storage for saved activations: per-group quantize / dequantize and the range they need.

The forward pass stays exact; only the copy autograd keeps for backward is stored as int8. A tensor's channel
dimension (heads, or hidden channels) is cut into G equal groups, each with its own range: channel c belongs to
group c // (C // G), and

    q = clamp(round((x - shift[g]) / scale[g]), -128, 127),    x_hat = q * scale[g] + shift[g].

`round` is stochastic, so the stored activations, and hence the gradients computed from them, are unbiased:
v = (x - shift) / scale rounds up with probability frac(v) (floor(v) + [u < frac(v)], u ~ U[0, 1): distributed
as floor(v + u)). Or half-up to nearest when stochastic=False. u comes from a counter-based hash of (seed, flat
element index), not from torch's generator, so the torch path below and the Triton path (kernels.triton_quant)
produce the same bits (the hash and everything else both must agree on: kernels.quant_common), a run is
reproducible, and quantizing touches no global RNG state.

Backends: "torch" (any device), "triton" (CUDA, or CPU under TRITON_INTERPRET=1). "auto" picks triton on CUDA
and torch elsewhere. Both do all arithmetic in fp32 whatever the input dtype. "torch-rand" is the fast CPU path
for training: the same arithmetic, vectorised over whole groups, with the rounding noise drawn from a seeded
torch.Generator instead of the hash (same distribution, different bits; about 3x faster on CPU).

Both torch paths work through the tensor in slabs of equal size (the last may be shorter). With shapes_only=True
(fake tensors, which have no values: the memory planner) they run only the slabs whose allocations differ, see
worked_slabs; the planner's trace then sees the same memory at a fraction of the operators.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import resolve_backend
from kernels.quant_common import (
    QMAX,
    QMIN,
    SCALE_FLOOR,
    group_layout,
    prepare_dequantize,
    prepare_quantize,
    uniform_from_index,
)
from kernels.slabs import worked_slabs

BACKENDS = ("auto", "torch", "torch-rand", "triton")
# The torch path works through the flat tensor in chunks so its int64 index / hash temporaries (512 KiB each)
# stay in cache: ~50x faster on CPU than whole-tensor temporaries, and no 8-bytes-per-element memory spike.
CHUNK = 1 << 16


def torch_quantize_int8(
    x: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, seed: int, stochastic: bool = True,
    shapes_only: bool = False,
) -> Tensor:
    """Torch twin of triton_quantize_int8 (any device); see quantize_int8."""
    span, inv_scale, shift, key = prepare_quantize(x, scale, shift, channel_dim, seed)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    flat, q_flat = x.reshape(-1), q.view(-1)
    num_groups = scale.shape[0]
    for start in worked_slabs(flat.numel(), CHUNK, shapes_only):
        idx = torch.arange(start, min(start + CHUNK, flat.numel()), device=x.device)
        group = idx // span % num_groups
        v = (flat[start : start + CHUNK].float() - shift[group]) * inv_scale[group]
        # Clamp before rounding: floor(v) is then a code, and v == 127 has frac 0, so q needs no second clamp.
        v = v.clamp(QMIN, QMAX)
        floor = v.floor()
        frac = v - floor
        # Stochastic: round up with probability frac (u < frac), so E[q] = v. Comparing u with frac, rather
        # than flooring v + u, avoids a rounded add that a compiler could contract into an FMA with the scaling.
        below_2_32 = start + CHUNK <= 2**32
        up = uniform_from_index(idx, key, below_2_32=below_2_32) < frac if stochastic else frac >= 0.5
        q_flat[start : start + CHUNK] = (floor + up).to(torch.int8)
    return q


def torch_dequantize_int8(q: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, dtype: torch.dtype) -> Tensor:
    """Torch twin of triton_dequantize_int8 (any device); see dequantize_int8."""
    span, scale, shift = prepare_dequantize(q, scale, shift, channel_dim, dtype)
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    num_groups = scale.shape[0]
    # [outer, G, span]: every run of span elements shares one group, so scale and shift broadcast.
    q3 = q.reshape(-1, num_groups, span)
    out = q3.float() * scale.view(1, -1, 1) + shift.view(1, -1, 1)
    return out.to(dtype).reshape(q.shape)


def rand_quantize_int8(
    x: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, seed: int, stochastic: bool = True,
    shapes_only: bool = False,
) -> Tensor:
    """Fast twin of torch_quantize_int8: codes from the same formula; u from torch.Generator(seed)."""
    span, inv_scale, shift, key = prepare_quantize(x, scale, shift, channel_dim, seed)
    num_groups = scale.shape[0]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel() == 0:
        return q
    # [outer, G, span]: one scale and shift per middle index; work through slabs of outer rows so the fp32
    # temporaries stay near CHUNK * 16 elements.
    x3, q3 = x.reshape(-1, num_groups, span), q.view(-1, num_groups, span)
    inv_scale, shift = inv_scale.view(1, -1, 1), shift.view(1, -1, 1)
    generator = torch.Generator(device=x.device).manual_seed(key)
    rows = max(1, CHUNK * 16 // (num_groups * span))
    for start in worked_slabs(x3.shape[0], rows, shapes_only):
        v = ((x3[start : start + rows].float() - shift) * inv_scale).clamp_(QMIN, QMAX)
        floor = v.floor()
        frac = v.sub_(floor)
        up = torch.rand(frac.shape, generator=generator, device=frac.device) < frac if stochastic else frac >= 0.5
        q3[start : start + rows] = floor.add_(up).to(torch.int8)
    return q


def _resolve(backend: str, x: Tensor) -> str:
    return resolve_backend("quantization", backend, BACKENDS, x, off_cuda="torch")


def quantize_int8(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    *,
    channel_dim: int,
    seed: int,
    stochastic: bool = True,
    backend: str = "auto",
    shapes_only: bool = False,
) -> Tensor:
    """x: any float dtype, any shape [..., C (at channel_dim), ...]; scale, shift: float32 [G], G divides C
    -> q: int8, x's shape, contiguous.

    q = clamp(round((x - shift[g]) / scale[g]), -128, 127) for channel c in group g = c // (C // G). round is
    stochastic (up with probability frac, from a hash of (seed, flat index in x's logical row-major order), so
    a non-contiguous x gives the codes of its contiguous copy) or half-up to nearest. Same seed, same bits on
    both backends; vary the seed per step and per tensor. NaN inputs give unspecified codes.

    shapes_only: x has no values (a fake tensor): the torch paths run only the slabs that allocate differently
    (worked_slabs) and leave the other codes unset; the Triton kernel is one launch either way.
    """
    resolved = _resolve(backend, x)
    if resolved == "triton":
        from kernels.triton_quant import triton_quantize_int8

        return triton_quantize_int8(x, scale, shift, channel_dim=channel_dim, seed=seed, stochastic=stochastic)
    if resolved == "torch-rand":
        return rand_quantize_int8(x, scale, shift, channel_dim=channel_dim, seed=seed, stochastic=stochastic,
                                  shapes_only=shapes_only)
    return torch_quantize_int8(x, scale, shift, channel_dim=channel_dim, seed=seed, stochastic=stochastic,
                               shapes_only=shapes_only)


def dequantize_int8(
    q: Tensor, scale: Tensor, shift: Tensor, *, channel_dim: int, dtype: torch.dtype, backend: str = "auto"
) -> Tensor:
    """q: int8 [..., C (at channel_dim), ...]; scale, shift: float32 [G] -> x_hat: dtype, q's shape, contiguous.

    x_hat = q * scale[g] + shift[g] in fp32 (multiply and add rounded separately), then cast to dtype.
    """
    if _resolve(backend, q) == "triton":
        from kernels.triton_quant import triton_dequantize_int8

        return triton_dequantize_int8(q, scale, shift, channel_dim=channel_dim, dtype=dtype)
    return torch_dequantize_int8(q, scale, shift, channel_dim=channel_dim, dtype=dtype)


def group_range(x: Tensor, num_groups: int, channel_dim: int) -> tuple[Tensor, Tensor]:
    """x: float [..., C (at channel_dim), ...] -> (min, max), float32 [num_groups] each, on x's device.

    The batch statistics behind a caller's running range estimate. Rounded outward to fp32 (float64 inputs), so
    the range always covers x. An empty x has no range: the caller should skip its update.
    """
    if x.numel() == 0:
        raise ValueError(f"group_range of an empty tensor {tuple(x.shape)}: skip the running-range update instead")
    _, span = group_layout(x.shape, channel_dim, num_groups)
    x3 = x.detach().reshape(-1, num_groups, span)
    lo, hi = x3.amin(dim=(0, 2)), x3.amax(dim=(0, 2))
    lo32, hi32 = lo.float(), hi.float()
    if x.dtype == torch.float64:
        lo32 = torch.where(lo32.double() > lo, torch.nextafter(lo32, lo32.new_tensor(float("-inf"))), lo32)
        hi32 = torch.where(hi32.double() < hi, torch.nextafter(hi32, hi32.new_tensor(float("inf"))), hi32)
    return lo32, hi32


def scale_shift_from_range(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """lo, hi: [G] -> (scale, shift), float32 [G], mapping [lo, hi] onto the codes [-128, 127].

    scale = (hi - lo) / 255, floored at SCALE_FLOOR (a constant group has hi == lo); shift = lo + 128 * scale,
    i.e. the midpoint plus half a step, so lo -> -128 and hi -> 127 exactly.
    """
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(SCALE_FLOOR)
    return scale, lo - QMIN * scale
