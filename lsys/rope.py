"""Rotary position embeddings on global positions, with HuggingFace's scaling rules for context extension.

The inverse frequencies are computed in float32 with the operations transformers uses (transformers 5.23,
modeling_rope_utils), so they are bit-identical to the ones a pretrained checkpoint was trained and is served
with: a frequency off by one float32 ulp moves the angle at position 1e6 by ~0.06 rad. The angles themselves,
position x frequency, are formed in float64 (transformers forms them in float32, which at position 1e5 is off
by up to ~6e-3 rad): positions are global ids, so every rank of every layout rotates its shard exactly as the
full sequence would be.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lsys.config import RopeScalingConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig) -> tuple[Tensor, float]:
    """-> (inverse frequencies [head_dim/2] float32, the factor the cos/sin tables are scaled by)."""
    kind = scaling.rope_type
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind == "linear":
        inv_freq /= scaling.factor
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq, 1.0


def _llama3(inv_freq: Tensor, s: RopeScalingConfig) -> Tensor:
    # Wavelengths longer than the pretraining context / low_freq_factor are interpolated by `factor`, those
    # shorter than context / high_freq_factor kept; in between, a smooth blend of the two.
    context = s.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = context / s.low_freq_factor, context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(s: RopeScalingConfig) -> float:
    """YaRN's scale of the cos/sin tables (so of every attention logit, squared): given, or 0.1 ln(factor) + 1."""
    if s.attention_factor:
        return s.attention_factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    return mscale(s.factor)


def _yarn(dim: int, theta: float, s: RopeScalingConfig) -> tuple[Tensor, float]:
    # Dimensions that rotate more than beta_fast times over the pretraining context keep their frequency
    # (extrapolation), those rotating fewer than beta_slow times are interpolated by `factor`, with a linear
    # ramp between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp.float()
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, yarn_attention_factor(s)


def rope_tables(positions: Tensor, inv_freq: Tensor, scale: float = 1.0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """positions: [B, S] global ids, inv_freq: [head_dim/2] -> cos, sin: [B, S, 1, head_dim/2] in `dtype`,
    times `scale` (YaRN's attention factor; 1 otherwise). Angles in float64 (see the module docstring)."""
    angles = positions.double()[..., None] * inv_freq.to(device=positions.device, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, S, H, D]; rotates (first half, second half) pairs, as Llama/NeoX do, in the tables' precision."""
    x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
