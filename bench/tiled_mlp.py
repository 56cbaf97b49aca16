"""Tiled feed-forward on one process: peak memory and forward+backward time of the SwiGLU feed-forward untiled,
tiled by lsys (model.mlp_chunk_tokens, lsys.tiling) and by DeepSpeed's `TiledMLP` (ALST), side by side.

    python bench/tiled_mlp.py                      # hidden 256, ffn 1024, S=8192, B=1, fp32, chunks of 1024
    python bench/tiled_mlp.py --quick              # S=2048, 2 repeats: does every method still run?

Peak: net bytes allocated during one forward+backward (allocator records, bench/measure.py), on top of the
input, weights and output gradient. Time: the methods take turns for `--repeats` rounds (a shared machine's
noise falls on all of them); median and min-max. Exactness: the input and weight gradients against the untiled
ones in fp32, and under bf16 autocast (the trainer's mixed precision: cache off), where a recompute that does
not run under the forward's autocast computes other gradients.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from measure import peak_allocated
from report import MIB, write_results
from rich.console import Console
from rich.table import Table

from lsys.config import ModelConfig
from lsys.model import FeedForward

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "tiled_mlp.json"


def _deepspeed(ffn: FeedForward, chunk_tokens: int):
    """DeepSpeed's TiledMLP around the same module, as its docstring patches HF's LlamaMLP."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def run(x):
        shards = math.ceil(x.shape[1] / chunk_tokens)
        return TiledMLP.apply(lambda module, piece: module._swiglu(piece), ffn, x, shards, list(ffn.parameters()))

    return run


def _methods(hidden: int, ffn_hidden: int, chunk: int) -> dict:
    untiled = FeedForward(ModelConfig(hidden_size=hidden, ffn_hidden_size=ffn_hidden))
    tiled = FeedForward(ModelConfig(hidden_size=hidden, ffn_hidden_size=ffn_hidden, mlp_chunk_tokens=chunk))
    tiled.load_state_dict(untiled.state_dict())
    peer = FeedForward(ModelConfig(hidden_size=hidden, ffn_hidden_size=ffn_hidden))
    peer.load_state_dict(untiled.state_dict())
    return {"untiled": (untiled, untiled), "lsys tiled": (tiled, tiled),
            "deepspeed TiledMLP": (peer, _deepspeed(peer, chunk))}


def _step(module, run, x, grad, bf16: bool = False):
    """One forward+backward; returns (input gradient, weight gradients)."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = run(leaf)
    out.backward(grad.to(out.dtype))
    return leaf.grad, [p.grad for p in module.parameters()]


def _errors(got, want) -> dict[str, float]:
    """Largest error relative to the reference's largest entry: of the input gradient, of any weight gradient.
    Under bf16 the weight gradients' sums over tokens round differently when split by chunk; the input
    gradient's entries are per token and equal the untiled ones exactly when recomputed at the same precision."""
    def error(g, w):
        return ((g.float() - w.float()).abs().max() / w.float().abs().max()).item()

    return {"input_grad": error(got[0], want[0]),
            "weight_grads": max(error(g, w) for g, w in zip(got[1], want[1], strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.repeats, args.output = 2048, 2, None
    torch.manual_seed(0)
    methods = _methods(args.hidden, args.ffn, args.chunk)
    x = torch.randn(1, args.seq_len, args.hidden)
    grad = torch.randn(1, args.seq_len, args.hidden)
    reference = _step(*methods["untiled"], x, grad)
    reference_bf16 = _step(*methods["untiled"], x, grad, bf16=True)
    rows = {}
    for name, (module, run) in methods.items():
        _step(module, run, x, grad)  # warm-up
        rows[name] = {"peak_bytes": peak_allocated(lambda m=module, r=run: _step(m, r, x, grad)),
                      "error_fp32": _errors(_step(module, run, x, grad), reference),
                      "error_bf16": _errors(_step(module, run, x, grad, bf16=True), reference_bf16),
                      "times_s": []}
    for _ in range(args.repeats):
        for name, (module, run) in methods.items():
            start = time.perf_counter()
            _step(module, run, x, grad)
            rows[name]["times_s"].append(time.perf_counter() - start)
    for row in rows.values():
        row["time_s"] = statistics.median(row["times_s"])
    results = {"shape": {"batch": 1, "seq_len": args.seq_len, "hidden": args.hidden, "ffn_hidden": args.ffn,
                         "chunk_tokens": args.chunk, "dtype": "float32"},
               "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "machine": platform.machine(), "methods": rows}
    table = Table(title=f"SwiGLU fwd+bwd, B=1 S={args.seq_len} hidden={args.hidden} ffn={args.ffn} fp32, "
                        f"chunks of {args.chunk}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    for column in ("method", "time s", "min-max s", "peak MiB", "fp32 err dx / dW", "bf16 err dx / dW"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['time_s']:.3f}", f"{min(row['times_s']):.3f}-{max(row['times_s']):.3f}",
                      f"{row['peak_bytes'] / MIB:.1f}",
                      *(f"{row[key]['input_grad']:.0e} / {row[key]['weight_grads']:.0e}"
                        for key in ("error_fp32", "error_bf16")))
    Console().print(table)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
