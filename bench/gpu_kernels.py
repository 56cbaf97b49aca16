"""The kernel checks of bench/gpu_check.py: block attention parity against float64, a ring emulated on one device,
speed against SDPA, and the int8 quantizer's two paths.

Inputs are drawn once in float64 and rounded to bfloat16-representable values, so one float64 reference serves
every dtype under test: the inputs each kernel sees are exactly the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.attention_kernels import attention_flops as forward_flops
from bench.attention_kernels import time_cpu
from kernels import (
    attention_backward,
    attention_forward,
    dequantize_int8,
    group_range,
    quantize_int8,
    scale_shift_from_range,
)
from kernels.attention import choose_backend
from kernels.merge import merge_attention
from parallel.context.layout import chunk_layout, shard_indices
from parallel.context.ring import block_plan

# Relative RMS error (||got - ref|| / ||ref||) allowed for out, dq, dk, dv, and the largest absolute lse error.
# 16-bit: a few times the RMS error of rounding the outputs alone (2^-9 relative); fp32 must be ieee-accurate (TF32
# products would miss by ~1e-3).
TOLERANCE = {torch.bfloat16: (1e-2, 1e-3), torch.float16: (2e-3, 1e-3), torch.float32: (1e-5, 1e-4)}
REFERENCE_ROWS = 512  # query rows per slice of the float64 reference: [B, H, rows, S] scores at a time


def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, device: str,
                seed: int = 0) -> dict[str, Tensor]:
    """q, dout [B, S, Hq, D] and k, v [B, S, Hkv, D]: float64 holding bfloat16-representable values."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(h: int) -> Tensor:
        return torch.randn(batch, seq, h, head_dim, generator=gen, device=device).bfloat16().double()

    return {"q": draw(heads), "k": draw(kv_heads), "v": draw(kv_heads), "dout": draw(heads)}


@torch.no_grad()
def reference(x: dict[str, Tensor], causal: bool) -> dict[str, Tensor]:
    """The float64 block attention and its gradients, a slice of query rows at a time (the [S, S] matrix of a long
    sequence would not fit): out, dq [B, S, Hq, D]; lse [B, Hq, S]; dk, dv [B, S, Hkv, D]."""
    q, dout = x["q"], x["dout"]
    group = q.shape[2] // x["k"].shape[2]
    k, v = (x[n].repeat_interleave(group, dim=2) for n in ("k", "v"))
    seq, scale = q.shape[1], 1.0 / math.sqrt(q.shape[3])
    out, lse = torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], seq)
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def probabilities(lo: int, hi: int) -> tuple[Tensor, int]:
        keys = hi if causal else seq  # causal rows [lo, hi) see keys [0, hi)
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi], k[:, :keys]) * scale
        if causal:
            rows = torch.arange(lo, hi, device=q.device)[:, None]
            scores.masked_fill_(torch.arange(keys, device=q.device)[None, :] > rows, float("-inf"))
        return scores, keys

    for lo in range(0, seq, REFERENCE_ROWS):
        hi = min(lo + REFERENCE_ROWS, seq)
        scores, keys = probabilities(lo, hi)
        lse[:, :, lo:hi] = torch.logsumexp(scores, dim=-1)
        out[:, lo:hi] = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse[:, :, lo:hi, None]), v[:, :keys])
    for lo in range(0, seq, REFERENCE_ROWS):
        hi = min(lo + REFERENCE_ROWS, seq)
        scores, keys = probabilities(lo, hi)
        probs = torch.exp(scores - lse[:, :, lo:hi, None])
        dv[:, :keys] += torch.einsum("bhqk,bqhd->bkhd", probs, dout[:, lo:hi])
        dprobs = torch.einsum("bqhd,bkhd->bhqk", dout[:, lo:hi], v[:, :keys])
        delta = (dout[:, lo:hi] * out[:, lo:hi]).sum(-1).transpose(1, 2)[..., None]
        dscores = probs * (dprobs - delta) * scale
        dq[:, lo:hi] = torch.einsum("bhqk,bkhd->bqhd", dscores, k[:, :keys])
        dk[:, :keys] += torch.einsum("bhqk,bqhd->bkhd", dscores, q[:, lo:hi])
    fold = (*dk.shape[:2], x["k"].shape[2], group, dk.shape[3])
    return {"out": out, "lse": lse, "dq": dq, "dk": dk.view(fold).sum(3), "dv": dv.view(fold).sum(3)}


def compare(got: dict[str, Tensor], ref: dict[str, Tensor], dtype: torch.dtype) -> dict:
    """Relative RMS errors of out, dq, dk, dv, the largest lse error, and whether all are within TOLERANCE."""
    errors = {}
    for name in ("out", "dq", "dk", "dv"):
        diff = got[name].double() - ref[name]
        errors[name] = float(diff.norm() / ref[name].norm())
    errors["lse"] = float((got["lse"].double() - ref["lse"]).abs().max())
    relative, lse_bound = TOLERANCE[dtype]
    finite = all(math.isfinite(e) for e in errors.values())
    ok = finite and errors["lse"] <= lse_bound and all(errors[n] <= relative for n in ("out", "dq", "dk", "dv"))
    return {"errors": errors, "tolerance": {"relative_rms": relative, "lse_abs": lse_bound}, "ok": ok}


def block_call(backend: str, x: dict[str, Tensor], dtype: torch.dtype, causal: bool) -> dict[str, Tensor]:
    """One kernel forward and backward on x cast to dtype -> out, lse, dq, dk, dv."""
    q, k, v, dout = (x[n].to(dtype) for n in ("q", "k", "v", "dout"))
    out, lse = attention_forward(q, k, v, causal=causal, backend=backend)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def ring_emulation(backend: str, x: dict[str, Tensor], dtype: torch.dtype, ring: int) -> dict[str, Tensor]:
    """Causal ring attention over `ring` zigzag ranks, run in one process: each rank's queries against every
    rank's K/V block by the ring's own block plan, partial results merged by their lse in fp32, then each block's
    backward with the GLOBAL out and lse, dq/dK/dV accumulated in fp32 -> full-sequence out, lse, dq, dk, dv."""
    q, k, v, dout = (x[n].to(dtype) for n in ("q", "k", "v", "dout"))
    seq = q.shape[1]
    layout = chunk_layout("zigzag", ring)
    index = [shard_indices(seq, ring_size=ring, ring_rank=r).to(q.device) for r in range(ring)]
    local = seq // ring
    out, lse = torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], seq, dtype=torch.float32)
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    for rank in range(ring):
        mine = index[rank]
        run_out = run_lse = None
        calls = []
        for step in range(ring):  # the ring's order: the own block first
            source = (rank - step) % ring
            theirs = index[source]
            for rows, keys, causal in block_plan(source, rank, local, True, layout):
                qb, kb, vb = q[:, mine[rows]], k[:, theirs[keys]], v[:, theirs[keys]]
                block_out, block_lse = attention_forward(qb, kb, vb, causal=causal, backend=backend)
                calls.append((rows, theirs[keys], causal))
                if run_out is None:  # the own block covers every row
                    run_out, run_lse = block_out.float(), block_lse.float()
                else:
                    run_out[:, rows], run_lse[:, :, rows] = merge_attention(
                        run_out[:, rows], run_lse[:, :, rows], block_out, block_lse)
        out[:, mine], lse[:, :, mine] = run_out.to(dtype), run_lse
        for rows, keys, causal in calls:
            qrows = mine[rows]
            grads = attention_backward(dout[:, qrows], q[:, qrows], k[:, keys], v[:, keys], out[:, qrows],
                                       lse[:, :, qrows].contiguous(), causal=causal, backend=backend)
            dq[:, qrows] += grads[0].float()
            dk[:, keys] += grads[1].float()
            dv[:, keys] += grads[2].float()
    return {"out": out, "lse": lse, "dq": dq.to(dtype), "dk": dk.to(dtype), "dv": dv.to(dtype)}


def runnable(backend: str, x: dict[str, Tensor], dtype: torch.dtype, causal: bool) -> str | None:
    """None when `backend` can run these inputs in dtype, else why not."""
    q, k = x["q"][:, :1].to(dtype), x["k"][:, :1].to(dtype)
    try:
        choose_backend(backend, q, k, causal=causal)
    except ValueError as error:
        return str(error)
    if backend == "triton" and not q.is_cuda:
        from kernels.triton_attention import _interpreted

        if not _interpreted():
            return "Triton needs CUDA, or TRITON_INTERPRET=1 on CPU"
    return None


# --- speed ---------------------------------------------------------------------------------------------------

def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    """Forward FLOPs by bench/attention_kernels.py's convention; with the backward 3.5x forward."""
    return forward_flops(batch, heads, seq, head_dim, causal) * (3.5 if backward else 1.0)


def median_ms(fn: Callable[[], object], device: str) -> float:
    """Median time of fn in milliseconds: triton.testing.do_bench on CUDA, a few wall-clock calls on CPU."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return time_cpu(fn, warmup=1, iters=3)


def kernel_runs(backend: str, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures of an lsys block kernel, causal."""
    def forward():
        return attention_forward(q, k, v, causal=True, backend=backend)

    def both():
        out, lse = forward()
        attention_backward(dout, q, k, v, out, lse, causal=True, backend=backend)

    return forward, both


def sdpa_runs(sdpa_backend: str, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> tuple[Callable, Callable]:
    """(forward, forward+backward) closures of F.scaled_dot_product_attention pinned to one SDPA backend, causal,
    grouped K/V as they are (enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "cpu": SDPBackend.FLASH_ATTENTION}[sdpa_backend]
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dout_t = dout.transpose(1, 2)

    def forward():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    def both():
        torch.autograd.grad(forward(), (qt, kt, vt), dout_t)

    return forward, both


# --- int8 storage ----------------------------------------------------------------------------------------------

def quant_check(shape: tuple[int, ...], device: str, triton_ok: bool) -> dict:
    """Quantize and dequantize a bf16 activation [B, S, H, D] per head: the Triton path must equal the torch path
    bit for bit (same seed); GB/s of each (bytes read + written / median time)."""
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(shape, generator=gen, device=device).bfloat16()
    channel_dim, groups = 2, shape[2]
    scale, shift = scale_shift_from_range(*group_range(x, groups, channel_dim))
    row = {"shape": list(shape), "dtype": "bfloat16"}
    paths = ["torch"] + (["triton"] if triton_ok else [])
    codes = {}
    for path in paths:
        def quantize(path=path):
            return quantize_int8(x, scale, shift, channel_dim=channel_dim, seed=11, backend=path)

        codes[path] = quantize()
        restored = dequantize_int8(codes[path], scale, shift, channel_dim=channel_dim, dtype=torch.bfloat16,
                                   backend=path)
        moved = x.numel() * (x.element_size() + 1)
        row[f"{path}_quantize_gb_s"] = moved / median_ms(quantize, device) / 1e6
        row[f"{path}_dequantize_gb_s"] = moved / median_ms(
            lambda path=path: dequantize_int8(codes[path], scale, shift, channel_dim=channel_dim,
                                              dtype=torch.bfloat16, backend=path), device) / 1e6
        # Stochastic rounding moves a value by less than one step (scale) before the bf16 output rounds it.
        row[f"{path}_max_error_steps"] = float(((restored.float() - x.float()).abs().amax(dim=(0, 1, 3))
                                                / scale).max())
    if triton_ok:
        row["bit_equal"] = bool(torch.equal(codes["torch"], codes["triton"]))
    else:
        row["bit_equal"] = None
        row["note"] = "Triton not run (no CUDA)"
    return row
