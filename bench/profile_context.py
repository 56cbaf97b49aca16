"""Where the time of one context-parallel attention step goes: block kernels versus everything else.

    python bench/profile_context.py                      # S=8192, 2 gloo ranks, ours + DeepSpeed + torch ring
    python bench/profile_context.py --methods ours-ring torch-ring --steps 5

Every method of bench/context_attention.py uses the same aten CPU flash kernels (ring-attention-pytorch aside),
so a difference in step time is a difference in what surrounds them. Each rank runs each method under
torch.profiler for `--steps` steps (methods taking turns, after one warmup step each); the table gives the
median step, the part spent inside the flash forward/backward ops, and the largest other ops by self time,
averaged over steps and ranks. Self time of an autograd node (e.g. _RingAttentionBackward) is Python between
ops plus waiting for the peer rank (a blocking receive or all-to-all is not an op of its own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from context_attention import ours_methods
from peers import build_peers
from rich.console import Console
from rich.table import Table

KERNELS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)
DEFAULT_METHODS = ("ours-ring", "ours-ulysses", "deepspeed-ulysses", "torch-ring")


def _profile_rank(seq_len: int, heads: int, head_dim: int, names: list[str], steps: int) -> dict:
    """Per method: step seconds, kernel seconds, and self seconds by op name summed over the profiled steps."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    peers, _ = build_peers(seq_len)
    methods = [m for m in ours_methods(seq_len) + peers if m.name in names]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq_len, heads, head_dim, generator=gen) for _ in range(4)]
    inputs = {m.name: [t.index_select(1, m.positions).contiguous() for t in full] for m in methods}
    found = {m.name: {"step_s": [], "kernel_s": [], "self_s": defaultdict(float)} for m in methods}
    for repeat in range(steps + 1):
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            q, k, v = (t.clone().requires_grad_() for t in inputs[method.name][:3])
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                method.attend(q, k, v).backward(inputs[method.name][3])
                seconds = time.perf_counter() - start
            if repeat == 0:  # warmup
                continue
            row, averages = found[method.name], prof.key_averages()
            row["step_s"].append(seconds)
            row["kernel_s"].append(sum(e.self_cpu_time_total for e in averages if e.key in KERNELS) / 1e6)
            for event in averages:
                row["self_s"][event.key] += event.self_cpu_time_total / 1e6
    return {name: {**row, "self_s": dict(row["self_s"])} for name, row in found.items()}


def _print(per_rank: list[dict], steps: int, top: int) -> None:
    table = Table(title=f"one fwd+bwd step per method, {len(per_rank)} gloo ranks, {steps} profiled steps")
    for column in ("method", "step ms", "flash kernels ms", "other ms", "other %", f"top {top} other ops, ms/step"):
        table.add_column(column, justify="left" if column in ("method", f"top {top} other ops, ms/step") else "right")
    for name in per_rank[0]:
        rows = [rank[name] for rank in per_rank]
        step = statistics.median(s for row in rows for s in row["step_s"])
        kernel = statistics.median(s for row in rows for s in row["kernel_s"])
        others: dict[str, float] = defaultdict(float)
        for row in rows:
            for op, seconds in row["self_s"].items():
                if op not in KERNELS:
                    others[op] += seconds / (steps * len(rows))
        largest = sorted(others.items(), key=lambda item: -item[1])[:top]
        table.add_row(name, f"{step * 1e3:.0f}", f"{kernel * 1e3:.0f}", f"{(step - kernel) * 1e3:.0f}",
                      f"{100 * (step - kernel) / step:.1f}", ", ".join(f"{op} {s * 1e3:.1f}" for op, s in largest))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def main(argv: list[str] | None = None) -> None:
    from launch.local import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per method after one warmup step")
    parser.add_argument("--top", type=int, default=6, help="how many non-kernel ops to list")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    args = parser.parse_args(argv)
    per_rank = spawn(_profile_rank, args.ranks, (args.seq, args.heads, args.head_dim, args.methods, args.steps),
                     init_backend="gloo", timeout_s=1800)
    _print(per_rank, args.steps, args.top)


if __name__ == "__main__":
    main()
