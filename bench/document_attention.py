"""Document-masked attention on the aten CPU path: masked vs plain causal time against the work the mask keeps.

Single process, forward + backward through `kernels.attention` (B=1, S=8192, H=8, D=64, causal fp32 by default)
for several document mixes of one packed row: one document, 8 and 64 equal documents, and a power-law mix
(Pareto lengths, fixed seed). Masked work is one flash call per document, so its time over plain causal should
be about the fraction of causal (query, key) pairs the mask keeps. Cases are interleaved within each repeat and
the median over repeats is reported. With `--ranks N` the same row is sharded over an N-rank ring and timed
through `parallel.context.attention` on every rank, both zigzag and with the layout `balance_layout` chooses for
the mix; each repeat counts its busiest rank, and a mix of one long document followed by short ones is added
(zigzag balances it worst).

    python bench/document_attention.py [--seq 8192] [--repeats 5] [--ranks 2]

Prints a table and writes bench/results/document_attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import attention  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def power_law_lengths(seq: int, alpha: float, seed: int) -> list[int]:
    """Document lengths >= 1 drawn from Pareto(alpha), scaled up, until they fill `seq` (the last one cut)."""
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < seq:
        draw = torch.rand((), generator=gen).item()
        lengths.append(max(1, int(16 * (1.0 - draw) ** (-1.0 / alpha))))
    lengths[-1] -= sum(lengths) - seq
    return lengths


def mixes(seq: int, seed: int, ring: bool = False) -> dict[str, list[int]]:
    cases = {
        "1 document": [seq],
        "8 equal": [seq // 8] * 8,
        "64 equal": [seq // 64] * 64,
        "power law": power_law_lengths(seq, alpha=1.2, seed=seed),
    }
    if ring:
        cases["half + 64"] = [seq // 2] + [seq // 128] * 64
    return cases


def causal_fraction(lengths: list[int], seq: int) -> float:
    """Causal pairs inside documents over causal pairs of the whole row."""
    return sum(n * (n + 1) // 2 for n in lengths) / (seq * (seq + 1) // 2)


def fwd_bwd_seconds(q, k, v, dout, document_ids, layout=None) -> float:
    """One forward + backward; with a layout, of ring attention over the world on this rank's shard."""
    q.grad = k.grad = v.grad = None
    start = time.perf_counter()
    if layout is not None:
        import torch.distributed as dist

        from parallel.context import attention as cp_attention

        out = cp_attention(q, k, v, causal=True, ring_group=dist.group.WORLD, layout=layout, backend="aten",
                           document_ids=document_ids)
    else:
        out = attention(q, k, v, causal=True, backend="aten", document_ids=document_ids)
    out.backward(dout)
    return time.perf_counter() - start


def timings(args: dict, ring: bool = False) -> dict[str, list[float]]:
    """Seconds of every repeat of plain causal and of each mix; on a ring rank, of this rank's shard, under zigzag
    and (keys ending " balanced") the balanced layout of the mix."""
    gen = torch.Generator().manual_seed(args["seed"])
    shape = (1, args["seq"], args["heads"], args["head_dim"])
    full = [torch.randn(shape, generator=gen) for _ in range(4)]
    cases = mixes(args["seq"], args["seed"], ring)
    ids = {name: torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n))[None] for name, n in cases.items()}
    runs = {name: (None, ids[name], None) for name in cases}  # name -> (layout, ids, the inputs' layout)
    if ring:
        import torch.distributed as dist

        from parallel.context import balance_layout, shard

        world = dist.group.WORLD
        runs = {name: ("zigzag", ids[name]) for name in cases}
        runs |= {f"{name} balanced": (balance_layout(ids[name], dist.get_world_size()), ids[name]) for name in cases}
        inputs = {layout: [shard(x, ring_group=world, layout=layout).requires_grad_(True) for x in full]
                  for layout, _ in runs.values()}
        runs = {name: (layout, shard(docs, ring_group=world, layout=layout), inputs[layout])
                for name, (layout, docs) in runs.items()}
        runs["plain causal"] = ("zigzag", None, inputs["zigzag"])
    else:
        inputs = [x.requires_grad_(True) for x in full]
        runs = {name: (None, docs, inputs) for name, (_, docs, _) in runs.items()}
        runs["plain causal"] = (None, None, inputs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for layout, docs, (q, k, v, dout) in runs.values():  # warm-up, once per layout
        fwd_bwd_seconds(q, k, v, dout.detach(), docs, layout)
    for _ in range(args["repeats"]):
        for name, (layout, docs, (q, k, v, dout)) in runs.items():
            times[name].append(fwd_bwd_seconds(q, k, v, dout.detach(), docs, layout))
    return times


def ring_timings(args: dict) -> dict[str, list[float]]:
    """Every repeat's time of the busiest rank of an args["ranks"]-rank ring."""
    from launch.local import spawn

    per_rank = spawn(timings, args["ranks"], (args, True), init_backend="gloo", timeout_s=1800)
    return {name: [max(rank[name][i] for rank in per_rank) for i in range(args["repeats"])]
            for name in per_rank[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1, help="ring ranks (1: one process, no ring)")
    parser.add_argument("--no-json", action="store_true", help="print only (quick checks at small --seq)")
    args = parser.parse_args(argv)

    parser_args = {"seq": args.seq, "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats,
                   "seed": args.seed, "ranks": args.ranks}
    ring = args.ranks > 1
    cases = mixes(args.seq, args.seed, ring)
    times = ring_timings(parser_args) if ring else timings(parser_args)
    plain = statistics.median(times["plain causal"])

    rows = []
    where = f"ring of {args.ranks} ranks (zigzag unless balanced), busiest rank" if ring else \
        f"{torch.get_num_threads()} threads"
    print(f"aten fwd+bwd, B=1 S={args.seq} H={args.heads} D={args.head_dim} causal fp32, {where}, "
          f"median of {args.repeats}; plain causal {plain * 1e3:.0f} ms")
    header = f"{'mix':<12} {'docs':>5} {'ms':>8} {'masked/plain':>13} {'pairs kept':>11}"
    print(header + (f" {'balanced ms':>12} {'balanced/plain':>15}" if ring else ""))
    for name, lengths in cases.items():
        median = statistics.median(times[name])
        row = {"mix": name, "documents": len(lengths), "ms": median * 1e3, "ratio": median / plain,
               "pairs_kept": causal_fraction(lengths, args.seq), "times_ms": [t * 1e3 for t in times[name]]}
        line = f"{name:<12} {len(lengths):>5} {row['ms']:>8.0f} {row['ratio']:>13.3f} {row['pairs_kept']:>11.3f}"
        if ring:
            balanced = statistics.median(times[f"{name} balanced"])
            row |= {"balanced_ms": balanced * 1e3, "balanced_ratio": balanced / plain,
                    "balanced_times_ms": [t * 1e3 for t in times[f"{name} balanced"]]}
            line += f" {row['balanced_ms']:>12.0f} {row['balanced_ratio']:>15.3f}"
        rows.append(row)
        print(line)

    if not args.no_json:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / ("document_attention.json" if args.ranks == 1 else f"document_attention_ring{args.ranks}.json")
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "ranks": args.ranks, "seq": args.seq,
                "heads": args.heads, "head_dim": args.head_dim, "repeats": args.repeats, "seed": args.seed,
                "plain_causal_ms": plain * 1e3, "plain_causal_times_ms": [t * 1e3 for t in times["plain causal"]]}
        path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
