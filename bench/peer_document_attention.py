"""Document-masked causal attention over a ring of gloo ranks: lsys against PyTorch's own context parallelism.

Packed documents (the mixes of bench/document_attention.py, one row B=1, S=8192, H=8, D=64, causal fp32 by
default) are sharded over `--ranks` processes of this machine (gloo, loopback) and attended with a document mask:

- lsys zigzag:   `parallel.context.attention` (aten blocks) with the zigzag layout;
- lsys balanced: the same with the layout `balance_layout` chooses from the mix's document ids;
- torch CP flex: `torch.distributed.tensor.experimental` context parallelism for flex_attention
  (`_ContextParallel` FLEX style: all-gathered K/V, a `BlockMask` built from the document ids and sharded with
  `_context_parallel_shard`, rows dealt by the `_PTRRLoadBalancer`, the one of its balancers that takes any
  document mix), as torchtitan runs it.

First every way of running PyTorch's context parallelism with a document mask is tried once at a small size; each
records "ok" or the first line of its error. The flex CP is timed for forward + backward only if that runs; on
CPU flex_attention has no backward (torch 2.13), so then its forward alone is timed, against lsys's forward under
no_grad, besides lsys's forward + backward. Correctness: at `--check-seq` every case's gathered output (and
dq/dk/dv where it trains) is compared with a single-process float64 masked reference (max abs error). Timing:
every case on every rank, cases interleaved within each repeat, each call after a barrier, after one warm-up
call (which compiles flex); a repeat counts its busiest rank and the median over `--repeats` is reported.

    python bench/peer_document_attention.py [--seq 8192] [--repeats 3] [--ranks 2]

Prints a table and writes bench/results/peer_document_attention.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.document_attention import causal_fraction, mixes  # noqa: E402
from bench.report import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LSYS_CASES = ("lsys zigzag", "lsys balanced")
FLEX_CASE = "torch CP flex"
FLEX_TRAIN = "flex CP, compiled flex_attention, PTRR balancer, fwd+bwd"
FLEX_FORWARD = "flex CP, compiled flex_attention, PTRR balancer, forward only"


def document_ids(lengths: list[int]) -> torch.Tensor:
    """[1, S] int64 id of the document at each position of a packed row."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def inputs(seq: int, heads: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    """q, k, v, dout: [1, S, H, D] fp32, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((1, seq, heads, head_dim), generator=gen) for _ in range(4)]


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def reference(q, k, v, dout, ids) -> list[torch.Tensor]:
    """Float64 masked causal attention: out, dq, dk, dv, all [B, S, H, D]."""
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    seq = q.shape[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    keep = (ids[:, :, None] == ids[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    out.backward(dout.double())
    return [out.detach(), q.grad, k.grad, v.grad]


# ---------------------------------------------------------------------------------------------- lsys on a rank


class LsysCase:
    """This rank's shards of one mix under one lsys layout; `step` is one forward + backward."""

    def __init__(self, full: list[torch.Tensor], ids: torch.Tensor, layout) -> None:
        import torch.distributed as dist

        from parallel.context import shard

        self.group, self.layout = dist.group.WORLD, layout
        self.q, self.k, self.v, self.dout = (shard(x, seq_dim=1, ring_group=self.group, layout=layout) for x in full)
        for x in (self.q, self.k, self.v):
            x.requires_grad_(True)
        self.ids = shard(ids, seq_dim=1, ring_group=self.group, layout=layout)

    def step(self, grad: bool = True) -> torch.Tensor:
        """Forward + backward, or (grad False) the forward alone under no_grad."""
        from parallel.context import attention

        self.q.grad = self.k.grad = self.v.grad = None
        with torch.set_grad_enabled(grad):
            out = attention(self.q, self.k, self.v, causal=True, ring_group=self.group, layout=self.layout,
                            backend="aten", document_ids=self.ids)
        if grad:
            out.backward(self.dout)
        return out

    def gathered(self, grad: bool = True) -> list[torch.Tensor]:
        """out (and dq, dk, dv) of the full row after one step, every rank."""
        from parallel.context import gather

        out = self.step(grad).detach()
        return [gather(x, seq_dim=1, ring_group=self.group, layout=self.layout)
                for x in (out, self.q.grad, self.k.grad, self.v.grad)[:4 if grad else 1]]


# ----------------------------------------------------------------------------------- PyTorch's CP on a rank


class FlexCase:
    """PyTorch's context-parallel flex_attention for one mix: the module wrapped by the FLEX `_ContextParallel`
    style (K/V all-gathered before the call, gradients reduce-scattered after), inputs and block mask sharded by
    `_context_parallel_shard` after the load balancer rearranges the rows."""

    def __init__(self, full: list[torch.Tensor], ids: torch.Tensor, compiled: bool = True,
                 balancer: str = "ptrr") -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental._attention import (
            _context_parallel_shard,
            _ContextParallel,
            _HeadTailLoadBalancer,
            _PTRRLoadBalancer,
        )
        from torch.distributed.tensor.parallel import parallelize_module
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # Every mix (and size) compiles flex_attention anew for its mask; past dynamo's default limit of 8
        # compilations the calls would silently fall back to the unfused eager flex_attention.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        world = dist.get_world_size()
        self.mesh = init_device_mesh("cpu", (world,))
        seq = ids.shape[1]
        docs = ids[0]

        def document_causal(b, h, q_idx, kv_idx):
            return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)

        fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

        class Flex(torch.nn.Module):
            def forward(self, q, k, v, block_mask):
                return fn(q, k, v, block_mask=block_mask)

        self.attn = parallelize_module(Flex(), self.mesh, _ContextParallel(
            seq_dim=2, attention_type=_ContextParallel.AttentionType.FLEX))
        block_mask = create_block_mask(document_causal, 1, 1, seq, seq, device="cpu")
        self.balancer = (_PTRRLoadBalancer(block_mask, world) if balancer == "ptrr"
                         else _HeadTailLoadBalancer(seq, world, "cpu"))
        heads_first = [x.transpose(1, 2).contiguous() for x in full]  # flex takes [B, H, S, D]
        *tensors, self.block_mask = _context_parallel_shard(self.mesh, [*heads_first, block_mask], [2] * 5,
                                                            self.balancer)
        self.q, self.k, self.v, self.dout = tensors

    def step(self, grad: bool = True) -> torch.Tensor:
        """Forward + backward, or (grad False) the forward alone under no_grad (CPU flex has no backward)."""
        self.q.grad = self.k.grad = self.v.grad = None
        for x in (self.q, self.k, self.v):
            x.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = self.attn(self.q, self.k, self.v, self.block_mask)
        if grad:
            out.backward(self.dout)
        return out

    def gathered(self, grad: bool = True) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = self.step(grad).detach()
        restore = self.balancer._generate_indices(restore=True)[0]
        result = []
        for x in (out, self.q.grad, self.k.grad, self.v.grad)[:4 if grad else 1]:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            result.append(torch.cat(parts, dim=2).index_select(2, restore).transpose(1, 2))
        return result


def sdpa_context_parallel(full: list[torch.Tensor], ids: torch.Tensor | None) -> None:
    """The older `context_parallel` context manager (ring SDPA, head-tail balancing): forward + backward of
    scaled_dot_product_attention, with the document mask as a boolean attn_mask (ids given) or plain causal."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    q, k, v, dout = (x.transpose(1, 2).contiguous() for x in full)
    with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2] * 4):
        # The context restores its buffers by resizing them on exit: leaves that require grad are copies.
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        if ids is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            seq = ids.shape[1]
            keep = (ids[0][:, None] == ids[0][None, :]) & torch.ones(seq, seq, dtype=torch.bool).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, None])
        out.backward(dout)


def peer_attempts(full: list[torch.Tensor], ids: torch.Tensor) -> dict[str, str]:
    """Each way of running PyTorch's CP with a document mask at a small size: "ok" or its error's first line."""
    import torch.distributed as dist

    def flex(compiled: bool, grad: bool, balancer: str = "ptrr"):
        return lambda: FlexCase(full, ids, compiled=compiled, balancer=balancer).step(grad)

    tries = {
        FLEX_TRAIN: flex(True, True),
        "flex CP, compiled flex_attention, head-tail balancer, fwd+bwd": flex(True, True, "headtail"),
        "flex CP, eager flex_attention, PTRR balancer, fwd+bwd": flex(False, True),
        FLEX_FORWARD: flex(True, False),
        "SDPA context_parallel, document attn_mask, fwd+bwd": lambda: sdpa_context_parallel(full, ids),
        "SDPA context_parallel, plain causal (no mask), fwd+bwd": lambda: sdpa_context_parallel(full, None),
    }
    status = {}
    for name, run in tries.items():
        try:
            run()
            status[name] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure is the finding
            status[name] = first_line(error)
        dist.barrier()
    return status


def rank_main(args: dict) -> dict:
    """On every rank: the peer attempts, the correctness checks and the timings."""
    import torch.distributed as dist

    from parallel.context import balance_layout

    world = dist.get_world_size()
    check_seq = args["check_seq"]
    small = inputs(check_seq, args["heads"], args["head_dim"], args["seed"])
    check_mixes = mixes(check_seq, args["seed"], ring=True)
    attempts = peer_attempts(small, document_ids(check_mixes["power law"]))
    # A failed compiled attempt marks flex_attention's frame as skipped: later calls would silently run eager.
    torch._dynamo.reset()
    modes = {name: ("fwd+bwd", "fwd") for name in LSYS_CASES}
    flex_modes = tuple(mode for mode, attempt in (("fwd+bwd", FLEX_TRAIN), ("fwd", FLEX_FORWARD))
                       if attempts[attempt] == "ok")
    if flex_modes:
        modes[FLEX_CASE] = flex_modes

    def cases(full, ids):
        made = {"lsys zigzag": LsysCase(full, ids, "zigzag"),
                "lsys balanced": LsysCase(full, ids, balance_layout(ids, world))}
        if flex_modes:
            made[FLEX_CASE] = FlexCase(full, ids)
        return made

    errors: dict[str, dict[str, dict[str, float]]] = {}
    for mix, lengths in check_mixes.items():
        ids = document_ids(lengths)
        want = reference(*small, ids)
        errors[mix] = {}
        for name, case in cases(small, ids).items():
            grad = "fwd+bwd" in modes[name]
            got = case.gathered(grad)
            keys = ("out", "dq", "dk", "dv")[:len(got)]
            errors[mix][name] = {key: (g.double() - w).abs().max().item()
                                 for key, g, w in zip(keys, got, want[:len(got)], strict=True)}

    full = inputs(args["seq"], args["heads"], args["head_dim"], args["seed"])
    runs = {(mix, name, mode): case for mix, lengths in mixes(args["seq"], args["seed"], ring=True).items()
            for name, case in cases(full, document_ids(lengths)).items() for mode in modes[name]}
    for (_, _, mode), case in runs.items():  # warm-up (and, for flex, compilation)
        case.step(mode == "fwd+bwd")
    times: dict[str, list[float]] = {"|".join(key): [] for key in runs}
    for _ in range(args["repeats"]):
        for key, case in runs.items():
            dist.barrier()
            start = time.perf_counter()
            case.step(key[2] == "fwd+bwd")
            times["|".join(key)].append(time.perf_counter() - start)
    return {"attempts": attempts, "errors": errors, "modes": modes, "times": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--check-seq", type=int, default=256, help="sequence of the correctness checks")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks of the ring (processes on this machine)")
    parser.add_argument("--no-json", action="store_true", help="print only (quick checks at small --seq)")
    args = parser.parse_args(argv)

    from launch.local import spawn

    params = {"seq": args.seq, "check_seq": args.check_seq, "heads": args.heads, "head_dim": args.head_dim,
              "repeats": args.repeats, "seed": args.seed, "ranks": args.ranks}
    per_rank = spawn(rank_main, args.ranks, (params,), init_backend="gloo", timeout_s=3600)
    attempts, errors, modes = per_rank[0]["attempts"], per_rank[0]["errors"], per_rank[0]["modes"]
    busiest = {key: [max(rank["times"][key][i] for rank in per_rank) for i in range(args.repeats)]
               for key in per_rank[0]["times"]}
    peer_trains = "fwd+bwd" in modes.get(FLEX_CASE, ())

    print(f"PyTorch {torch.__version__} context parallelism with a document mask, CPU tensors, gloo, "
          f"S={args.check_seq}, {args.ranks} ranks:")
    for name, status in attempts.items():
        print(f"  {name}: {status}")
    if not peer_trains:
        print("  -> no way of PyTorch's CP runs forward + backward here: fwd+bwd times lsys only"
              + ("; the flex CP forward is timed against lsys's forward" if FLEX_CASE in modes else ""))

    print(f"\nmax abs error vs float64 reference, S={args.check_seq} "
          "(out / dq / dk / dv; out only where forward only):")
    for mix, by_case in errors.items():
        print(f"  {mix:<11} " + "  ".join(f"{name} " + "/".join(f"{e:.1e}" for e in errs.values())
                                         for name, errs in by_case.items()))

    columns = [(name, mode) for mode in ("fwd+bwd", "fwd") for name, name_modes in modes.items() if mode in name_modes]
    width = max(13, *(len(name) for name, _ in columns))
    print(f"\nms, B=1 S={args.seq} H={args.heads} D={args.head_dim} causal fp32 document mask, "
          f"{args.ranks} gloo ranks, busiest rank, median of {args.repeats}")
    print(f"{'':<11} {'':>5} {'':>11} " + " ".join(f"{mode:>{width}}" for _, mode in columns))
    print(f"{'mix':<11} {'docs':>5} {'pairs kept':>11} " + " ".join(f"{name:>{width}}" for name, _ in columns))
    rows = []
    for mix, lengths in mixes(args.seq, args.seed, ring=True).items():
        row = {"mix": mix, "documents": len(lengths), "pairs_kept": causal_fraction(lengths, args.seq), "cases": {}}
        for name, mode in columns:
            series = busiest[f"{mix}|{name}|{mode}"]
            row["cases"].setdefault(name, {})[mode] = {"ms": statistics.median(series) * 1e3,
                                                       "times_ms": [t * 1e3 for t in series]}
        rows.append(row)
        print(f"{mix:<11} {len(lengths):>5} {row['pairs_kept']:>11.3f} "
              + " ".join(f"{row['cases'][name][mode]['ms']:>{width}.0f}" for name, mode in columns))

    results = {"torch": torch.__version__, "ranks": args.ranks,
               "threads_per_rank": max(1, (os.cpu_count() or 1) // args.ranks),
               "seq": args.seq, "check_seq": args.check_seq, "heads": args.heads, "head_dim": args.head_dim,
               "repeats": args.repeats, "seed": args.seed, "peer_attempts": attempts,
               "peer_timed_fwd_bwd": peer_trains, "timed_modes": modes, "max_abs_errors": errors, "results": rows}
    write_results(results, None if args.no_json else RESULTS / "peer_document_attention.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
