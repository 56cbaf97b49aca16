"""Context-parallel attention against its peers, side by side on local gloo ranks (CPU).

    python bench/context_attention.py            # B=1, S=8192, H=8, D=64, causal fp32 on 2 ranks
    python bench/context_attention.py --quick    # S=2048: a check that every method still runs

Methods, all over the same full-sequence inputs and the same ranks (one spawn):
- ours: ring (zigzag), Ulysses, and the ring x Ulysses hybrid when there are 4 or more ranks (parallel.context).
- peers (bench/peers.py): DeepSpeed's Ulysses DistributedAttention, torch's private _templated_ring_attention,
  and ring-attention-pytorch's ring_flash_attn.

Each method first runs one checked step (fwd+bwd) that is also the warmup: its output and q/k/v gradients are
compared with a single-process float64 SDPA reference, and its peak allocated bytes and saved-for-backward bytes
are recorded. Then the methods take turns for `--repeats` timed steps, so the noise of a shared machine falls on
all of them alike; compare ratios, not seconds. A second part counts the bytes our ring and Ulysses save for
backward per rank, and their peak, at a fixed sequence length for 1, 2 and 4 ranks.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from measure import peak_allocated, saved_bytes_of, timed
from peers import KNOWN_ISSUES, Method, build_peers, peer_versions
from report import print_tables, write_results

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "context_attention.json"
# Output and gradient errors are judged relative to the reference's largest magnitude: fp32 against fp64.
RELATIVE_TOLERANCE = 1e-4
MEMORY_METHOD = (
    "peak_bytes: torch.profiler(profile_memory=True) records every CPU allocator allocation and free made by the "
    "rank during one forward+backward; the peak of their running sum is the memory the step needs on top "
    "of its inputs (q, k, v, dout shards), including outputs, gradients, saved activations, communication buffers "
    "and kernel scratch. saved_bytes: bytes of distinct storages packed by torch.autograd.graph.saved_tensors_hooks "
    "during the forward (what stays alive until backward)."
)
TIME_METHOD = (
    "time_s: after a barrier each rank times forward+backward; a step's time is the slowest rank's; median over "
    "repeats. Methods take turns within each repeat, starting one later each repeat. The checked step runs first "
    "and serves as the warmup. Ratios ours/peer are the median over repeats of the ratio within a repeat."
)


def _ours(name: str, seq_len: int, ring_group, ulysses_group, note: str) -> Method:
    from parallel.context import attention, group_shard_indices

    def attend(q, k, v):
        return attention(q, k, v, causal=True, ring_group=ring_group, ulysses_group=ulysses_group, layout="zigzag")

    positions = group_shard_indices(seq_len, ring_group=ring_group, ulysses_group=ulysses_group)
    return Method(name, positions, attend, note)


def ours_methods(seq_len: int) -> list[Method]:
    import torch.distributed as dist

    world, size, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    methods = [
        _ours("ours-ring", seq_len, world, None, "zigzag ring, aten CPU flash block kernel"),
        _ours("ours-ulysses", seq_len, None, world, "all-to-all over heads, aten CPU flash"),
    ]
    if size >= 4 and size % 2 == 0:
        # Ulysses over rank pairs {0,1},{2,3},... and ring across them; new_group is collective, so every rank
        # creates every group in the same order.
        pairs = [dist.new_group([r, r + 1]) for r in range(0, size, 2)]
        strided = [dist.new_group(list(range(offset, size, 2))) for offset in range(2)]
        note = f"ring {size // 2} x Ulysses 2"
        methods.append(_ours("ours-hybrid", seq_len, strided[rank % 2], pairs[rank // 2], note))
    return methods


def _compare_rank(data_path: str, repeats: int) -> dict:
    """One rank: check, profile and time every method. Returns per-method errors, bytes and step times."""
    data = torch.load(data_path, mmap=True, weights_only=True)
    seq_len = data["q"].shape[1]
    peers, unavailable = build_peers(seq_len)
    methods = ours_methods(seq_len) + peers
    results: dict[str, dict] = {name: {"status": "unavailable", "reason": why} for name, why in unavailable.items()}
    local = {}
    for method in methods:
        inputs = [data[name].index_select(1, method.positions).contiguous() for name in ("q", "k", "v", "dout")]
        local[method.name] = inputs
        leaves = [t.clone().requires_grad_() for t in inputs[:3]]
        holder = {}

        def step(method=method, leaves=leaves, holder=holder, dout=inputs[3]):
            out, holder["saved"] = saved_bytes_of(lambda: method.attend(*leaves))
            out.backward(dout)
            holder["out"] = out.detach()

        try:
            peak = peak_allocated(step)
        except Exception as error:  # a peer failing at run time is a result, not a crash of the benchmark
            results[method.name] = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
            continue
        errors, scales = {}, {}
        for what, got in zip(("out", "dq", "dk", "dv"), (holder["out"], *(t.grad for t in leaves)), strict=True):
            expected = data[f"ref_{what}"].index_select(1, method.positions)
            errors[what] = (got.double() - expected).abs().max().item()
            scales[what] = expected.abs().max().item()
        results[method.name] = {
            "status": "ran",
            "note": method.note,
            "peak_bytes": peak,
            "saved_bytes": holder["saved"],
            "errors": errors,
            "scales": scales,
            "times": [],
        }
    runnable = [m for m in methods if results[m.name]["status"] == "ran"]
    for repeat in range(repeats if runnable else 0):
        # Rotating the order keeps any method from always following the slow one (or always running first).
        shift = repeat % len(runnable)
        for method in runnable[shift:] + runnable[:shift]:
            q, k, v, dout = (t.clone().requires_grad_(i < 3) for i, t in enumerate(local[method.name]))
            seconds = timed(lambda m=method, q=q, k=k, v=v, d=dout: m.attend(q, k, v).backward(d))
            results[method.name]["times"].append(seconds)
    return results


def _activation_rank(seq_len: int, heads: int, head_dim: int) -> dict[str, int]:
    """Bytes saved for backward, and peak bytes of fwd+bwd, of one rank's shard for our ring and Ulysses."""
    import torch.distributed as dist

    from parallel.context import attention, shard

    size, world = dist.get_world_size(), dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, seq_len, heads, head_dim, generator=gen) for _ in range(4)]
    found = {}
    for name, groups in (("ring", (world, None)), ("ulysses", (None, world))):
        ring_group, ulysses_group = groups if size > 1 else (None, None)
        q, k, v, dout = (shard(t, 1, ring_group, ulysses_group) for t in full)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        holder = {}

        def step(leaves=leaves, dout=dout, holder=holder, r=ring_group, u=ulysses_group):
            out, holder["saved"] = saved_bytes_of(lambda: attention(*leaves, ring_group=r, ulysses_group=u))
            out.backward(dout)

        found[f"{name}_peak_bytes"] = peak_allocated(step)
        found[f"{name}_bytes"] = holder["saved"]
    return found


def _reference_data(batch: int, seq_len: int, heads: int, head_dim: int, path: Path) -> None:
    """Full-sequence fp32 inputs and their float64 SDPA output and gradients (one process, all cores)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1234)
    q, k, v, dout = (torch.randn(batch, seq_len, heads, head_dim, generator=gen) for _ in range(4))
    leaves = [t.double().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    out.backward(dout.double().transpose(1, 2))
    data = {"q": q, "k": k, "v": v, "dout": dout, "ref_out": out.detach().transpose(1, 2).contiguous()}
    for what, leaf in zip(("dq", "dk", "dv"), leaves, strict=True):
        data[f"ref_{what}"] = leaf.grad.transpose(1, 2).contiguous()
    torch.save(data, path)


def _merge_ranks(per_rank: list[dict]) -> dict[str, dict]:
    """One row per method: slowest rank per step, median over steps; worst rank's error and bytes."""
    merged = {}
    for name, first in per_rank[0].items():
        rows = [rank[name] for rank in per_rank]
        failed = next((row for row in rows if row["status"] != "ran"), None)
        if failed is not None:
            merged[name] = {"status": failed["status"], "reason": failed["reason"]}
            continue
        steps = [max(times) for times in zip(*(row["times"] for row in rows), strict=True)]
        errors = {w: max(row["errors"][w] for row in rows) for w in first["errors"]}
        scales = {w: max(row["scales"][w] for row in rows) for w in first["scales"]}
        wrong = [w for w in errors if errors[w] > RELATIVE_TOLERANCE * scales[w]]
        merged[name] = {
            "status": "ok" if not wrong else "wrong " + ", ".join(wrong),
            **({"known_issue": KNOWN_ISSUES[name]} if wrong and name in KNOWN_ISSUES else {}),
            "note": first["note"],
            "time_s": statistics.median(steps) if steps else None,
            "step_times_s": steps,
            "peak_bytes": max(row["peak_bytes"] for row in rows),
            "peak_bytes_per_rank": [row["peak_bytes"] for row in rows],
            "saved_bytes": max(row["saved_bytes"] for row in rows),
            "max_abs_error": max(errors.values()),
            "max_abs_error_by_tensor": errors,
            "reference_max_abs": scales,
        }
    return merged


def _ours_vs_peers(methods: dict[str, dict]) -> list[dict]:
    """ours / peer for every pair that ran: time paired by repeat, and per-rank peak bytes. Below 1: ours wins."""
    timed_rows = {name: row for name, row in methods.items() if row.get("time_s")}
    ours = [name for name in timed_rows if name.startswith("ours-")]
    pairs = []
    for name in ours:
        for peer, row in timed_rows.items():
            if peer in ours:
                continue
            paired = [a / b for a, b in zip(timed_rows[name]["step_times_s"], row["step_times_s"], strict=True)]
            pairs.append({
                "ours": name,
                "peer": peer,
                "peer_status": row["status"],
                "time_ratio": statistics.median(paired),
                "time_ratio_min": min(paired),
                "time_ratio_max": max(paired),
                "peak_ratio": timed_rows[name]["peak_bytes"] / row["peak_bytes"],
            })
    return pairs


def _goals(pairs: list[dict]) -> dict[str, bool]:
    """Per method of ours: faster than every peer that ran (median paired ratio below 1)."""
    names = dict.fromkeys(p["ours"] for p in pairs)
    return {name: all(p["time_ratio"] < 1 for p in pairs if p["ours"] == name) for name in names}


def _activation_rows(per_ranks: dict[int, list[dict]]) -> list[dict]:
    """Largest rank's bytes per rank count, and their ratio to one rank's; the goal is saved <= 1.1/P of it."""
    rows = []
    for ranks, found in per_ranks.items():
        row = {"ranks": ranks, **{key: max(rank[key] for rank in found) for key in found[0]}}
        row["goal_ratio"] = 1.1 / ranks
        rows.append(row)
    base = next((row for row in rows if row["ranks"] == 1), None)
    for row in rows:
        for kind in ("ring", "ulysses"):
            for key in (f"{kind}_bytes", f"{kind}_peak_bytes"):
                row[key.replace("bytes", "ratio")] = row[key] / base[key] if base else None
            row[f"{kind}_meets_goal"] = row[f"{kind}_ratio"] is not None and row[f"{kind}_ratio"] <= row["goal_ratio"]
    return rows


def run(args: argparse.Namespace) -> dict:
    from launch.local import spawn

    shape = {"batch": args.batch, "seq_len": args.seq, "heads": args.heads, "head_dim": args.head_dim,
             "ranks": args.ranks, "causal": True, "dtype": "float32"}
    with tempfile.TemporaryDirectory(prefix="context-attention-bench-") as tmp:
        data_path = Path(tmp) / "data.pt"
        _reference_data(args.batch, args.seq, args.heads, args.head_dim, data_path)
        per_rank = spawn(_compare_rank, args.ranks, (str(data_path), args.repeats), init_backend="gloo",
                         timeout_s=args.timeout, collective_timeout_s=args.timeout)
    per_ranks = {
        ranks: spawn(_activation_rank, ranks, (args.activation_seq, args.heads, args.head_dim), init_backend="gloo",
                     timeout_s=args.timeout)
        for ranks in args.activation_ranks
    }
    methods = _merge_ranks(per_rank)
    pairs = _ours_vs_peers(methods)
    return {
        "machine": {"cpu_count": os.cpu_count(), "threads_per_rank": max(1, (os.cpu_count() or 1) // args.ranks),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    **peer_versions()},
        "shape": shape,
        "repeats": args.repeats,
        "method": {"time": TIME_METHOD, "memory": MEMORY_METHOD,
                   "error": "max |out, dq, dk, dv - float64 torch SDPA on one process| over ranks; status 'wrong X' "
                            f"when an error exceeds {RELATIVE_TOLERANCE} x the reference's max |X|",
                   "ratios": "ours / peer: below 1, ours is faster or needs less memory"},
        "methods": methods,
        "ours_vs_peers": pairs,
        "faster_than_every_peer": _goals(pairs),
        "activations": {"seq_len": args.activation_seq, "heads": args.heads, "head_dim": args.head_dim,
                        "method": "largest rank; saved: saved_tensors_hooks during forward, distinct storages; "
                                  "peak: as peak_bytes above, over forward+backward",
                        "rows": _activation_rows(per_ranks)},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="full sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks; 4 or more adds ours-hybrid")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per method after the checked one")
    parser.add_argument("--activation-seq", type=int, default=4096)
    parser.add_argument("--activation-ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before all ranks are killed")
    parser.add_argument("--output", type=Path, help=f"JSON results (default {DEFAULT_OUTPUT.name} in bench/results; "
                                                     "--quick writes none unless given)")
    parser.add_argument("--quick", action="store_true", help="S=2048, activations at S=1024, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.activation_seq, args.repeats = 2048, 1024, 2
    elif args.output is None:
        args.output = DEFAULT_OUTPUT
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - started
    print_tables(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
