"""Int8 activation storage: error bounds, unbiased stochastic rounding, determinism, per-group ranges, layouts.

The torch path is tested here directly; the Triton path is compared with it bit for bit in
tests/kernels/quant_check.py, run in a child process (interpreted on CPU always, compiled when CUDA is present).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.quant as quant
from kernels import dequantize_int8, group_range, quantize_int8, scale_shift_from_range

ROOT = Path(__file__).resolve().parents[2]
EPS32 = torch.finfo(torch.float32).eps


def _x(shape, dtype=torch.float32, seed=0, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(dtype)


def _ranged(x, num_groups, channel_dim):
    return scale_shift_from_range(*group_range(x, num_groups, channel_dim))


def _per_element(param, shape, channel_dim):
    # [G] -> broadcastable to shape: channel c reads param[c // (C // G)].
    channels = shape[channel_dim]
    view = [1] * len(shape)
    view[channel_dim] = channels
    return param.double().repeat_interleave(channels // param.numel()).view(view)


def _roundtrip(x, scale, shift, channel_dim, **kwargs):
    q = quantize_int8(x, scale, shift, channel_dim=channel_dim, **kwargs)
    return q, dequantize_int8(q, scale, shift, channel_dim=channel_dim, dtype=torch.float32)


def _assert_within(x_hat, x, scale, shift, channel_dim, steps):
    # Allowed error: `steps` quantization steps, plus fp32 rounding of x, of (x - shift) / scale (|v| <= 128,
    # a few ulps) and of q * scale + shift: 1e-4 steps and 4 ulps of the magnitudes involved cover all three.
    s = _per_element(scale, x.shape, channel_dim)
    sh = _per_element(shift, x.shape, channel_dim)
    x = x.double()
    bound = s * (steps + 1e-4) + 4 * EPS32 * (x.abs() + sh.abs())
    err = (x_hat.double() - x).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.4f} > 1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape, channel_dim, groups", [((2, 9, 4, 8), 2, 4), ((3, 10, 12), -1, 3)])
@pytest.mark.parametrize("stochastic", [True, False])
def test_roundtrip_error_is_at_most_one_step_or_half_a_step(dtype, shape, channel_dim, groups, stochastic):
    x = _x(shape, dtype)
    scale, shift = _ranged(x, groups, channel_dim)
    q, x_hat = _roundtrip(x, scale, shift, channel_dim, seed=1, stochastic=stochastic)
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
    _assert_within(x_hat, x, scale, shift, channel_dim, steps=1.0 if stochastic else 0.5)
    # The range spans the codes exactly: each group's min and max land on -128 and 127.
    codes = q.movedim(channel_dim, -1).reshape(-1, groups, shape[channel_dim] // groups).transpose(0, 1)
    codes = codes.reshape(groups, -1)
    assert (codes.amin(1) == -128).all() and (codes.amax(1) == 127).all()


@pytest.mark.parametrize("stochastic", [True, False])
def test_out_of_range_values_clamp_to_both_ends(stochastic):
    lo, hi = torch.tensor([-1.0, 10.0]), torch.tensor([1.0, 30.0])
    scale, shift = scale_shift_from_range(lo, hi)
    x = torch.tensor([[-5.0, 0.0], [-1.5, 9.0], [1.2, 31.0], [7.0, 1e6], [float("-inf"), float("inf")]])
    q, x_hat = _roundtrip(x, scale, shift, 1, seed=0, stochastic=stochastic)
    expected = torch.tensor([[-128, -128], [-128, -128], [127, 127], [127, 127], [-128, 127]], dtype=torch.int8)
    assert torch.equal(q, expected)
    ends = torch.where(expected == -128, lo, hi)
    torch.testing.assert_close(x_hat, ends, rtol=0, atol=1e-5)


def test_stochastic_rounding_is_unbiased():
    # Values at every fraction of a step; the mean of N dequantized draws must approach x. A draw's error has
    # variance frac * (1 - frac) * scale**2 <= scale**2 / 4, so the mean of N has std <= scale / (2 sqrt(N)):
    # 5 of those per element (a 1-in-3.5-million Gaussian tail, times 256 elements), and 5 of the far smaller
    # std of the grand mean over all elements and draws, which catches a bias too small to see per element.
    scale, shift = torch.tensor([0.01]), torch.tensor([0.0])
    x = torch.linspace(-1.0, 1.0, 256)
    draws = 1600
    total = torch.zeros(256, dtype=torch.float64)
    for seed in range(draws):
        total += _roundtrip(x, scale, shift, 0, seed=seed)[1].double()
    bias = total / draws - x.double()
    per_element = 5 * 0.01 / (2 * math.sqrt(draws))
    assert bias.abs().max() <= per_element, bias.abs().max()
    assert abs(bias.mean()) <= 5 * 0.01 / (2 * math.sqrt(draws * 256))
    # The same test has the power to fail: nearest rounding of values a third of a step above a code is off by
    # a third of a step every time.
    x = (torch.arange(-100, 100) + 1 / 3) * 0.01
    nearest = _roundtrip(x, scale, shift, 0, seed=0, stochastic=False)[1]
    assert (nearest.double() - x.double()).abs().min() > 5 * per_element


def test_rounding_bits_are_reproducible_and_vary_with_the_seed():
    x = _x((4, 64, 8))
    scale, shift = _ranged(x, 8, -1)
    q = quantize_int8(x, scale, shift, channel_dim=-1, seed=123)
    assert torch.equal(q, quantize_int8(x, scale, shift, channel_dim=-1, seed=123))
    # Distinct seeds, including ones that differ only in their high 32 bits or sign, draw different bits: a code
    # differs with probability 2 frac (1 - frac), 1/3 on average over uniform fractions.
    for other in (124, 123 + 2**32, -123):
        differ = (q != quantize_int8(x, scale, shift, channel_dim=-1, seed=other)).float().mean().item()
        assert 0.25 < differ < 0.42, (other, differ)
    # Round-to-nearest uses no random bits.
    nearest = [quantize_int8(x, scale, shift, channel_dim=-1, seed=s, stochastic=False) for s in (0, 1)]
    assert torch.equal(*nearest)


def test_neighbouring_elements_round_independently():
    # Every element exactly half a step above a code: each rounds up with probability 1/2, independently of its
    # neighbour if the hash mixes well. Correlation of a fair coin sequence of n has std 1/sqrt(n).
    n = 1 << 14
    x = torch.full((n,), 0.5) * 0.01
    q = quantize_int8(x, torch.tensor([0.01]), torch.tensor([0.0]), channel_dim=0, seed=9).double()
    assert abs(q.mean().item() - 0.5) < 5 * 0.5 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([q[:-1], q[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


def test_each_group_keeps_its_own_precision():
    # Heads whose magnitudes span five decades: per-head ranges keep every head's error below one step of its
    # own range; a single range for the whole tensor rounds the small heads to nothing.
    magnitudes = torch.tensor([1e-3, 1e-2, 1.0, 1e2])
    x = _x((2, 16, 4, 8)) * magnitudes.view(1, 1, 4, 1)
    scale, shift = _ranged(x, 4, 2)
    _, per_head = _roundtrip(x, scale, shift, 2, seed=3)
    _, one_range = _roundtrip(x, *_ranged(x, 1, 2), 2, seed=3)
    for h, magnitude in enumerate(magnitudes.tolist()):
        ref = x[:, :, h].double()
        rel = ((per_head[:, :, h] - ref).abs().max() / ref.abs().max()).item()
        assert rel < 2 / 255, (h, rel)
        if magnitude < 1:
            assert ((one_range[:, :, h] - ref).abs().max() / ref.abs().max()).item() > 0.1
    assert scale[3] / scale[0] > 1e4


def test_groups_of_hidden_channels_follow_c_over_c_per_group():
    # 12 hidden channels in 3 groups of 4: channel c reads group c // 4. Give each group a different scale.
    x = _x((5, 7, 12)) * torch.tensor([0.1] * 4 + [1.0] * 4 + [10.0] * 4)
    lo, hi = group_range(x, 3, -1)
    groups = x.reshape(35, 3, 4)
    torch.testing.assert_close(lo, groups.amin(dim=(0, 2)), rtol=0, atol=0)
    torch.testing.assert_close(hi, groups.amax(dim=(0, 2)), rtol=0, atol=0)
    scale, shift = scale_shift_from_range(lo, hi)
    _, x_hat = _roundtrip(x, scale, shift, -1, seed=0, stochastic=False)
    _assert_within(x_hat, x, scale, shift, -1, steps=0.5)
    # The same tensor with the channels moved to the front, grouped there, gives the same codes per channel.
    q = quantize_int8(x, scale, shift, channel_dim=-1, seed=0, stochastic=False)
    moved = quantize_int8(x.movedim(-1, 0), scale, shift, channel_dim=0, seed=0, stochastic=False)
    assert torch.equal(moved, q.movedim(-1, 0))


def test_non_contiguous_input_quantizes_like_its_contiguous_copy():
    x = _x((3, 8, 6, 5)).transpose(1, 2)  # [3, 6, 8, 5], heads no longer outermost
    scale, shift = _ranged(x, 6, 1)
    q = quantize_int8(x, scale, shift, channel_dim=1, seed=11)
    assert torch.equal(q, quantize_int8(x.contiguous(), scale, shift, channel_dim=1, seed=11))
    strided = _x((4, 20), torch.bfloat16)[:, ::2]
    scale, shift = _ranged(strided, 2, -1)
    q = quantize_int8(strided, scale, shift, channel_dim=-1, seed=2)
    assert torch.equal(q, quantize_int8(strided.contiguous(), scale, shift, channel_dim=-1, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_computes_in_fp32_and_casts(dtype):
    x = _x((6, 4))
    scale, shift = _ranged(x, 2, 1)
    q = quantize_int8(x, scale, shift, channel_dim=1, seed=0)
    out = dequantize_int8(q, scale, shift, channel_dim=1, dtype=dtype)
    fp32 = dequantize_int8(q, scale, shift, channel_dim=1, dtype=torch.float32)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, fp32.to(dtype))


def test_range_maps_exactly_onto_the_codes():
    lo, hi = torch.tensor([-3.0, 0.5, 2.0]), torch.tensor([5.0, 0.5, 2.25])
    scale, shift = scale_shift_from_range(lo, hi)
    assert scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(-128 * scale + shift, lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(127 * scale + shift, hi, rtol=0, atol=1e-6)
    # A constant group (hi == lo) gets the floor, never 0: no NaN, and its value comes back.
    assert scale[1] == quant.SCALE_FLOOR
    x = torch.tensor([[0.0, 0.5, 2.1]] * 3)
    for stochastic in (True, False):
        q, x_hat = _roundtrip(x, scale, shift, 1, seed=0, stochastic=stochastic)
        assert torch.isfinite(x_hat).all()
        assert (x_hat[:, 1] == 0.5).all()
    # A zero scale passed in directly is floored the same way.
    zero = torch.zeros(3)
    assert torch.isfinite(_roundtrip(x, zero, torch.tensor([0.0, 0.5, 2.0]), 1, seed=0)[1]).all()


def test_float64_range_is_rounded_outward():
    x = torch.tensor([[1 / 3, -1 / 3], [0.1, 2 / 3]], dtype=torch.float64)
    lo, hi = group_range(x, 2, 1)
    assert lo.dtype == hi.dtype == torch.float32
    assert (lo.double() <= x.amin(0)).all() and (hi.double() >= x.amax(0)).all()
    assert (hi.double() - x.amax(0)).abs().max() < 1e-7


def test_work_is_chunked_without_changing_a_bit(monkeypatch):
    x = _x((3, 50, 4))
    scale, shift = _ranged(x, 4, -1)
    q = quantize_int8(x, scale, shift, channel_dim=-1, seed=5)
    monkeypatch.setattr(quant, "CHUNK", 7)
    assert torch.equal(q, quantize_int8(x, scale, shift, channel_dim=-1, seed=5))


def test_empty_tensors():
    scale, shift = torch.ones(2), torch.zeros(2)
    q = quantize_int8(torch.empty(0, 4), scale, shift, channel_dim=1, seed=0)
    assert q.shape == (0, 4) and q.dtype == torch.int8
    out = dequantize_int8(q, scale, shift, channel_dim=1, dtype=torch.bfloat16)
    assert out.shape == (0, 4) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="skip the running-range update"):
        group_range(torch.empty(0, 4), 2, 1)


def test_bad_arguments_raise_value_errors():
    x = torch.zeros(2, 6)
    ones, zeros = torch.ones(4), torch.zeros(4)
    for call, message in (
        (lambda: quantize_int8(x, ones, zeros, channel_dim=1, seed=0), "num_groups=4 must divide the 6"),
        (lambda: quantize_int8(x, ones[:2], zeros, channel_dim=1, seed=0), "equal length"),
        (lambda: quantize_int8(x, ones[:2], zeros[:2], channel_dim=2, seed=0), "channel_dim=2"),
        (lambda: quantize_int8(x.long(), ones[:2], zeros[:2], channel_dim=1, seed=0), "floating-point"),
        (lambda: quantize_int8(x, ones[:2], zeros[:2], channel_dim=1, seed=0, backend="cuda"), "backend='cuda'"),
        (lambda: dequantize_int8(x, ones[:2], zeros[:2], channel_dim=1, dtype=torch.float32), "int8"),
        (lambda: dequantize_int8(x.to(torch.int8), ones[:2], zeros[:2], channel_dim=1, dtype=torch.int32), "dtype"),
        (lambda: group_range(x, 4, 1), "num_groups=4"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            call()
    with pytest.raises(TypeError):
        quantize_int8(x, ones[:2], zeros[:2], channel_dim=1, seed=0.5)


def test_triton_backend_refuses_cpu_tensors_when_compiled():
    from kernels import triton_quant

    if triton_quant._interpreted():
        pytest.skip("this process imported triton in interpreter mode")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        quantize_int8(torch.zeros(2, 4), torch.ones(2), torch.zeros(2), channel_dim=1, seed=0, backend="triton")


def _run_check(device: str, interpret: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.quant_check", "--device", device],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"quant_check on {device} failed:\n{result.stdout}\n{result.stderr}"


def test_triton_interpreted_matches_torch_bit_for_bit():
    _run_check("cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
def test_triton_compiled_matches_torch_bit_for_bit():
    _run_check("cuda", interpret=False)


def test_generator_backend_matches_the_hash_path_in_distribution():
    # Round-to-nearest has no noise: both CPU paths give the same codes. Stochastic: same bounds, no bias.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 3, 16, generator=gen).transpose(1, 2)  # non-contiguous, channels in the middle
    lo, hi = group_range(x, 3, channel_dim=1)
    scale, shift = scale_shift_from_range(lo, hi)
    args = {"channel_dim": 1}
    nearest = quantize_int8(x, scale, shift, seed=0, stochastic=False, backend="torch-rand", **args)
    assert torch.equal(nearest, quantize_int8(x, scale, shift, seed=0, stochastic=False, backend="torch", **args))
    draws = torch.stack([
        dequantize_int8(quantize_int8(x, scale, shift, seed=s, backend="torch-rand", **args), scale, shift,
                        dtype=torch.float32, **args)
        for s in range(400)
    ])
    step = scale.view(-1, 1, 1)  # channels at dim 1 of [4, 3, 6, 16]
    assert ((draws - x).abs() <= step * (1 + 1e-6)).all()
    # Per element the mean of 400 draws has standard deviation <= step / (2 * sqrt(400)) = step / 40.
    assert ((draws.mean(0) - x).abs() <= step * 5 / 40).all()
    again = quantize_int8(x, scale, shift, seed=7, backend="torch-rand", **args)
    assert torch.equal(again, quantize_int8(x, scale, shift, seed=7, backend="torch-rand", **args))
