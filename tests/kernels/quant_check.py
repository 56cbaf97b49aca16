"""Triton int8 quantization checks, run as `python -m tests.kernels.quant_check [--device cpu|cuda]`.

A separate process because triton fixes interpreter-or-compiler when the kernel module is imported: on CPU the
caller sets TRITON_INTERPRET=1 in this process's environment. Every check is bit-for-bit against the torch path
(same device, same seed). Exits non-zero (with the assertion) on mismatch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import triton
import triton.language as tl

import kernels.triton_quant as triton_quant
from kernels import dequantize_int8, group_range, quantize_int8, scale_shift_from_range
from kernels.quant import torch_dequantize_int8, torch_quantize_int8
from kernels.quant_common import stream_key, uniform_from_index
from kernels.triton_quant import triton_dequantize_int8, triton_quantize_int8

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (shape, channel_dim, num_groups): heads in the middle, hidden-channel groups last, channels first, one group,
# and one tensor spanning several 1024-element programs with a ragged tail.
LAYOUTS = [((2, 5, 3, 4), 2, 3), ((3, 7, 8), -1, 4), ((6, 10), 0, 2), ((37,), 0, 1), ((3, 1000), 0, 3)]
SEEDS = (0, 2**40 + 7, -3)


@triton.jit
def _uniform_kernel(Idx, Out, n, key_bits, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(Idx + offs, mask=mask, other=0)
    tl.store(Out + offs, triton_quant._uniform(idx, key_bits.to(tl.uint32, bitcast=True), True), mask=mask)


def _params(x: torch.Tensor, channel_dim: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Ranges from the middle of x, so its extremes fall outside and exercise both clamps.
    lo, hi = group_range(x, num_groups, channel_dim)
    return scale_shift_from_range(lo * 0.8, hi * 0.8)


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{what}: {actual} vs {expected}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()
        raise AssertionError(f"{what}: {len(bad)} of {actual.numel()} differ, first at {bad[0].tolist()}")


def _check_pair(x: torch.Tensor, channel_dim: int, scale: torch.Tensor, shift: torch.Tensor, what: str) -> None:
    for seed in SEEDS:
        for stochastic in (True, False):
            kwargs = {"channel_dim": channel_dim, "seed": seed, "stochastic": stochastic}
            q = triton_quantize_int8(x, scale, shift, **kwargs)
            _assert_equal(q, torch_quantize_int8(x, scale, shift, **kwargs), f"quantize {what} {kwargs}")
    for dtype in DTYPES:
        out = triton_dequantize_int8(q, scale, shift, channel_dim=channel_dim, dtype=dtype)
        ref = torch_dequantize_int8(q, scale, shift, channel_dim=channel_dim, dtype=dtype)
        _assert_equal(out, ref, f"dequantize {what} to {dtype}")


def check_layouts(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape, channel_dim, num_groups in LAYOUTS:
        base = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        for dtype in DTYPES:
            x = base.to(device, dtype)
            scale, shift = _params(x, channel_dim, num_groups)
            _check_pair(x, channel_dim, scale, shift, f"{dtype} {shape} dim={channel_dim} G={num_groups}")


def check_edges(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    # Non-contiguous inputs: heads-outermost transpose and a strided slice. Codes follow the logical index.
    x = torch.randn(2, 3, 6, 4, generator=gen).to(device).transpose(1, 2)
    _check_pair(x, 2, *_params(x, 2, 3), "transposed")
    x = torch.randn(4, 12, generator=gen).to(device, torch.bfloat16)[:, ::2]
    _check_pair(x, -1, *_params(x, -1, 2), "strided")
    # A zero scale (constant group) hits the floor; infinities clamp to the ends.
    x = torch.randn(5, 4, generator=gen).to(device)
    x[:, 1] = 0.25
    x[0, 0], x[1, 0] = float("inf"), float("-inf")
    scale = torch.tensor([0.02, 0.0, 0.03, 0.01], device=device)
    shift = torch.tensor([0.0, 0.25, -0.1, 0.05], device=device)
    _check_pair(x, 1, scale, shift, "zero scale and infinities")

    # The int64-index kernels, forced on a small tensor, give the same bits as the int32 ones.
    x = torch.randn(3, 700, generator=gen).to(device)
    scale, shift = _params(x, 0, 3)
    limit = triton_quant.INDEX32_LIMIT
    try:
        triton_quant.INDEX32_LIMIT = 0
        _check_pair(x, 0, scale, shift, "int64 indices")
    finally:
        triton_quant.INDEX32_LIMIT = limit
    # ...and the hash folds the high index word exactly like the torch twin, across the 2**32 boundary.
    idx = torch.cat([torch.arange(2**32 - 40, 2**32 + 40), torch.arange(2**40, 2**40 + 48)]).to(device)
    for seed in SEEDS:
        key = stream_key(seed)
        out = torch.empty(idx.shape, dtype=torch.float32, device=device)
        _uniform_kernel[(1,)](idx, out, idx.numel(), key - 2**32 if key >= 2**31 else key, BLOCK=256)
        _assert_equal(out, uniform_from_index(idx, key), f"uniform at large indices, seed {seed}")

    # The dispatcher reaches the kernels by name; empty tensors launch nothing.
    x = torch.randn(2, 8, generator=gen).to(device)
    scale, shift = _params(x, 1, 2)
    q = quantize_int8(x, scale, shift, channel_dim=1, seed=5, backend="triton")
    _assert_equal(q, torch_quantize_int8(x, scale, shift, channel_dim=1, seed=5), "dispatcher quantize")
    out = dequantize_int8(q, scale, shift, channel_dim=1, dtype=torch.float32, backend="triton")
    _assert_equal(out, torch_dequantize_int8(q, scale, shift, channel_dim=1, dtype=torch.float32), "dispatcher")
    empty = torch.empty(0, 4, device=device)
    q = triton_quantize_int8(empty, scale, shift, channel_dim=1, seed=0)
    assert q.shape == (0, 4) and q.dtype == torch.int8
    assert triton_dequantize_int8(q, scale, shift, channel_dim=1, dtype=torch.bfloat16).shape == (0, 4)


def check_large(device: str) -> None:
    # Compiled only: a realistic activation, many programs; also a rough timing against the torch path.
    x = torch.randn(4, 2048, 8, 64, device=device, dtype=torch.bfloat16)
    scale, shift = _params(x, 2, 8)
    _check_pair(x, 2, scale, shift, "large")
    for name, fn in (("triton", triton_quantize_int8), ("torch", torch_quantize_int8)):
        fn(x, scale, shift, channel_dim=2, seed=1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn(x, scale, shift, channel_dim=2, seed=1)
        torch.cuda.synchronize()
        print(f"quantize {tuple(x.shape)} bf16 {name}: {(time.perf_counter() - start) / 10 * 1e3:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    checks = [check_layouts, check_edges] + ([check_large] if args.device == "cuda" else [])
    for check in checks:
        start = time.perf_counter()
        check(args.device)
        print(f"{check.__name__} on {args.device}: ok in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
