"""Block attention kernels against torch SDPA: speed (TFLOP/s) and accuracy.

GPU (default): Triton forward and forward+backward vs SDPA's flash backend, bf16, D=128, causal and not, over
sequence lengths at a roughly constant token count. Accuracy is the max abs error against SDPA's fp32 math
backend on a slice of the heads (the full fp32 score matrix would not fit at 16K).
CPU (`--cpu`): the aten path (torch's flash-for-CPU ops, as ring attention calls them) vs SDPA on a small shape.

    python bench/attention_kernels.py [--seqlens 1024 4096] [--heads 16] [--cpu]

Writes bench/results/attention_kernels_<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import attention, attention_forward

RESULTS = Path(__file__).resolve().parent / "results"
# Heads and batch rows of the fp32 accuracy reference: enough to catch a wrong kernel, small enough at 16K.
CHECK_HEADS = 2


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs by the usual convention (two matmuls); causal does half. Backward is 2.5x forward."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() by CUDA events, after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() by wall clock, after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sdpa(q, k, v, causal):
    # q: [B, S, H, D] -> [B, S, H, D]; SDPA itself works in [B, H, S, D].
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def fwd_bwd(fn: Callable, q, k, v, dout) -> Callable[[], None]:
    """A closure running fn forward and backward through autograd (grads are dropped, not accumulated)."""

    def run():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    return run


def max_errors(run: Callable, q, k, v, dout, causal: bool) -> tuple[float, float]:
    """Max abs error of out and of (dq, dk, dv) of `run` against SDPA's fp32 math backend, on a head slice."""
    part = (slice(0, 1), slice(None), slice(0, CHECK_HEADS))
    q, k, v, dout = (t[part].detach() for t in (q, k, v, dout))
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = run(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_inputs = [t.float().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = sdpa(*ref_inputs, causal)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.float())
    out_err = (out.float() - ref).abs().max().item()
    grad_err = max((g.float() - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))
    return out_err, grad_err


def bench_case(batch, heads, seq, head_dim, causal, dtype, device, warmup, iters) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    if device == "cuda":
        ours, backend, timer = "triton", SDPBackend.FLASH_ATTENTION, time_cuda
    else:
        ours, backend, timer = "aten", SDPBackend.FLASH_ATTENTION, time_cpu
    run_ours = lambda q, k, v: attention(q, k, v, causal=causal, backend=ours)
    run_sdpa = lambda q, k, v: sdpa(q, k, v, causal)
    flops = attention_flops(batch, heads, seq, head_dim, causal)
    row = {"batch": batch, "heads": heads, "seq": seq, "head_dim": head_dim, "causal": causal, "dtype": str(dtype)}
    with torch.no_grad():
        row[f"{ours}_fwd_ms"] = timer(lambda: attention_forward(q, k, v, causal=causal, backend=ours), warmup, iters)
        with sdpa_kernel(backend):
            row["sdpa_fwd_ms"] = timer(lambda: run_sdpa(q, k, v), warmup, iters)
    row[f"{ours}_fwd_bwd_ms"] = timer(fwd_bwd(run_ours, q, k, v, dout), warmup, iters)
    with sdpa_kernel(backend):
        row["sdpa_fwd_bwd_ms"] = timer(fwd_bwd(run_sdpa, q, k, v, dout), warmup, iters)
    for name in (ours, "sdpa"):
        row[f"{name}_fwd_tflops"] = flops / row[f"{name}_fwd_ms"] / 1e9
        row[f"{name}_fwd_bwd_tflops"] = 3.5 * flops / row[f"{name}_fwd_bwd_ms"] / 1e9
    row["max_err_out"], row["max_err_grad"] = max_errors(run_ours, q, k, v, dout, causal)
    return row


def print_table(title: str, ours: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in ("causal", "B", "H", "S", "D"):
        table.add_column(column, justify="right")
    for name in (ours, "sdpa"):
        table.add_column(f"{name} fwd ms (TF/s)", justify="right")
        table.add_column(f"{name} fwd+bwd ms (TF/s)", justify="right")
    table.add_column("max|err| out / grad", justify="right")
    for r in rows:
        cells = [str(r["causal"]), str(r["batch"]), str(r["heads"]), str(r["seq"]), str(r["head_dim"])]
        for name in (ours, "sdpa"):
            for kind in ("fwd", "fwd_bwd"):
                # 3 significant digits: CPU rates are hundredths of a TFLOP/s.
                cells.append(f"{r[f'{name}_{kind}_ms']:.2f} ({r[f'{name}_{kind}_tflops']:.3g})")
        cells.append(f"{r['max_err_out']:.1e} / {r['max_err_grad']:.1e}")
        table.add_row(*cells)
    # Off a terminal rich would fold the table to 80 columns.
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="time the aten CPU path instead of Triton on CUDA")
    parser.add_argument("--seqlens", type=int, nargs="+", help="default: 1K..16K on GPU, 512 1024 on CPU")
    parser.add_argument("--tokens", type=int, help="batch = clamp(tokens // seq, 1, 4); default 16K GPU, 1K CPU")
    parser.add_argument("--heads", type=int, help="default: 16 on GPU, 8 on CPU")
    parser.add_argument("--head-dim", type=int, help="default: 128 on GPU, 64 on CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)

    if args.cpu:
        device, device_name, ours = "cpu", "cpu", "aten"
        defaults = {"seqlens": [512, 1024], "heads": 8, "head_dim": 64, "dtype": "float32", "tokens": 1024}
    elif torch.cuda.is_available():
        device, device_name, ours = "cuda", torch.cuda.get_device_name(), "triton"
        defaults = {
            "seqlens": [1024, 2048, 4096, 8192, 16384], "heads": 16, "head_dim": 128, "dtype": "bfloat16",
            "tokens": 16384,
        }
    else:
        print("CUDA is not available: skipping the Triton GPU benchmark (use --cpu to time the aten CPU path).")
        return 0
    seqlens = args.seqlens or defaults["seqlens"]
    heads = args.heads or defaults["heads"]
    head_dim = args.head_dim or defaults["head_dim"]
    dtype = getattr(torch, args.dtype or defaults["dtype"])
    tokens = args.tokens or defaults["tokens"]

    rows = []
    for causal in (False, True):
        for seq in seqlens:
            batch = min(4, max(1, tokens // seq))
            rows.append(bench_case(batch, heads, seq, head_dim, causal, dtype, device, args.warmup, args.iters))
    print_table(f"attention kernels on {device_name} ({dtype})", ours, rows)

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"attention_kernels_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_').lower()}.json"
    meta = {"device": device_name, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cuda":
        import triton

        meta["triton"] = triton.__version__
    path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
