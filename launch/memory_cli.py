"""`lsys profile` (measure every rank's memory over real steps) and `lsys plan` (predict it for any world size and
search the layout that fits the longest sequence into a budget)."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from launch import exits


def add_commands(sub: argparse._SubParsersAction, config_help: str) -> None:
    p = sub.add_parser(
        "profile",
        help="measure each rank's memory over real training steps: table, memory.json, memory.png",
        description="Run N full-length training steps on every local rank and break each rank's memory down: "
                    "params, gathered params, grads, optimizer state, activations (by layer) and temporaries, "
                    "at the peak and over time. Writes OUT/memory.json and OUT/memory.png (and on CUDA a "
                    "memory snapshot per rank for https://pytorch.org/memory_viz). " + config_help,
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key=value config overrides")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for memory.json and memory.png")
    p.add_argument("--steps", type=int, default=2, help="training steps to measure (default 2: the second has "
                                                        "the optimizer state the first creates)")
    p.add_argument("--nproc", type=int, default=None, help="local ranks (default: cluster.num_workers)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="kill all ranks after this long")
    p.set_defaults(handler=profile_command)

    p = sub.add_parser(
        "plan",
        help="predict per-rank memory for any world size from a fake trace; search the longest sequence that fits",
        description="Trace one training step of one rank of a WORLD_SIZE-rank job with fake tensors and a fake "
                    "process group (no memory is allocated and no peer is needed), and print its memory next to "
                    "the analytic estimate (Megatron's per-layer formula with the context-parallel term). With "
                    "--budget-gib, search the parallel degrees, recomputation, int8 stored activations and MLP "
                    "tiling for the longest sequence that fits the budget per rank; with --host-budget-gib also "
                    "activation offload and the model state in host memory. " + config_help,
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/gpu_8b_128k.yaml")
    p.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key=value config overrides")
    p.add_argument("--world-size", type=int, default=None, help="ranks of the planned job (default: "
                                                                "cluster.num_workers)")
    p.add_argument("--budget-gib", type=float, default=None, metavar="GIB",
                   help="memory per rank; search the layouts for the longest sequence that fits")
    p.add_argument("--host-budget-gib", type=float, default=None, metavar="GIB",
                   help="host memory per rank the search may offload to (e.g. 256 for 2 TiB per 8-GPU node); "
                        "default: nothing is offloaded")
    p.add_argument("--top", type=int, default=3, help="candidates traced in the search (default 3)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="the search's traces run N at a time in child processes (default: the usable cores)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/plan.json and DIR/plan.png")
    p.set_defaults(handler=plan_command)


def _load(args: argparse.Namespace, ranks: int | None) -> tuple[Any, int]:
    from lsys.config import load_config
    from lsys.validation import validate

    cfg = load_config(args.config, args.overrides)
    world = ranks if ranks is not None else cfg.cluster.num_workers
    if world < 1:
        raise ValueError(f"world size {world}: need at least one rank")
    validate(cfg, world)
    return cfg, world


def profile_command(args: argparse.Namespace, console: Console) -> int:
    from launch.local import RankFailedError, spawn
    from launch.preflight import check_inputs, check_run_dir
    from lsys.config import to_dict
    from lsys.memory.profile import profile_rank
    from lsys.memory.report import layer_table, plot, rank_table, write_json

    try:
        cfg, nproc = _load(args, args.nproc)
        if args.steps < 1:
            raise ValueError(f"--steps={args.steps}: measure at least one step")
        if cfg.optim.offload != "none":
            raise ValueError(f"optim.offload={cfg.optim.offload}: profile runs local ranks; the offloaded state lives "
                             "in Ray actors (plan it with `lsys plan`, or set optim.offload=none)")
        check_run_dir(args.out, key="--out")
        check_inputs(cfg, nproc, local_ranks=nproc)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"lsys: profiling {args.steps} steps of {cfg.data.seq_len:,} tokens on {nproc} ranks",
                  highlight=False)
    try:
        ranks = spawn(profile_rank, nproc, (to_dict(cfg), args.steps, str(out.resolve())), timeout_s=args.timeout)
    except RankFailedError as exc:
        console.print(f"[bold red]lsys: rank {exc.rank} failed; all ranks stopped.[/]\n{exc.detail}", highlight=False)
        return 1
    except TimeoutError:
        console.print(f"[bold red]lsys: --timeout {args.timeout:g} s expired; all ranks stopped.[/]", highlight=False)
        return exits.TIMEOUT
    write_json(out / "memory.json", {"ranks": ranks, "steps": args.steps, "config": to_dict(cfg)})
    title = f"lsys profile: {Path(args.config).name}, {nproc} ranks, {cfg.data.seq_len:,} tokens"
    plot(ranks, out / "memory.png", title)
    output = _wide_console()
    output.print(rank_table(ranks, "measured memory per rank (tracked tensors at each rank's peak)"))
    output.print(layer_table(ranks[0]))
    console.print(f"wrote {out / 'memory.json'} and {out / 'memory.png'}", highlight=False)
    return 0


def plan_command(args: argparse.Namespace, console: Console) -> int:
    from launch.preflight import check_run_dir
    from lsys.config import to_dict
    from lsys.memory.analytic import analytic_estimate
    from lsys.memory.report import layer_table, plot, rank_table, write_json
    from lsys.memory.search import GIB, Budget, search
    from lsys.memory.trace import trace_rank, vocabulary_size

    started = time.perf_counter()
    try:
        cfg, world = _load(args, args.world_size)
        if args.budget_gib is not None and args.budget_gib <= 0:
            raise ValueError(f"--budget-gib={args.budget_gib}: give the memory per rank in GiB, e.g. 80")
        if args.host_budget_gib is not None and (args.host_budget_gib <= 0 or args.budget_gib is None):
            raise ValueError(f"--host-budget-gib={args.host_budget_gib}: give the host memory per rank in GiB, "
                             "e.g. 256, together with --budget-gib")
        if args.top < 1:
            raise ValueError(f"--top={args.top}: trace at least one candidate")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs={args.jobs}: run at least one trace at a time")
        if args.out:
            check_run_dir(args.out, key="--out")
        vocab = vocabulary_size(cfg)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    output = _wide_console()
    traced = {"rank": 0, **trace_rank(cfg, world).to_dict()}
    analytic = analytic_estimate(cfg, world, vocab)
    output.print(rank_table([traced], f"planned memory per rank: {world} ranks, {cfg.data.seq_len:,} tokens "
                                      "(traced; every rank alike)"))
    output.print(layer_table(traced, limit=6))
    output.print(_comparison(traced, analytic))
    document: dict[str, Any] = {"world_size": world, "traced": traced, "analytic": analytic.to_dict(),
                                "config": to_dict(cfg)}
    if args.budget_gib is not None:
        host = None if args.host_budget_gib is None else round(args.host_budget_gib * GIB)
        budget = Budget(round(args.budget_gib * GIB), host)
        try:
            with _search_progress(console) as progress:
                found = search(cfg, world, budget, vocab, top=args.top, progress=progress, workers=args.jobs)
        except ValueError as exc:
            return exits.invalid_input(console, exc)
        output.print(_candidates(found, args.budget_gib, args.host_budget_gib))
        document["budget_bytes"] = budget.device
        document["host_budget_bytes"] = budget.host
        document["candidates"] = [c.describe() for c in found]
        best = found[0].describe()
        layout = ("dp", "cp_ring", "cp_ulysses", "tp", "recompute", "quant", "offload", "fsdp_offload",
                  "mlp_chunk_tokens")
        document["chosen"] = {**{k: best[k] for k in layout}, "seq_len": best["traced_seq_len"],
                              "device_bytes_per_rank": best["traced_peak_bytes"],
                              "host_bytes_per_rank": best["traced_host_bytes"], "confirmed": best["confirmed"]}
    if args.out:
        out = Path(args.out)
        write_json(out / "plan.json", document)
        plot([traced], out / "plan.png", f"lsys plan: {Path(args.config).name}, rank 0 of {world}, "
                                         f"{cfg.data.seq_len:,} tokens (fake trace)")
        console.print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}", highlight=False)
    console.print(f"lsys plan: done in {time.perf_counter() - started:.1f} s", highlight=False)
    return 0


@contextlib.contextmanager
def _search_progress(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """The search's traces as a progress bar on a terminal (`console` writes to stderr), else a line a trace."""
    if not console.is_terminal:
        def line(what: str, done: int, planned: int) -> None:
            if what and done < planned:
                console.print(f"lsys plan: trace {done + 1}/{planned}: {what}", highlight=False)

        yield line
        return
    columns = (TextColumn("[bold]lsys plan: tracing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def show(what: str, done: int, planned: int) -> None:
            bar.update(task, completed=done, total=planned, **({"description": what} if what else {}))

        yield show


def _wide_console() -> Console:
    """Tables keep one line per row in logs and pipes too (rich assumes 80 columns there)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _comparison(traced: dict[str, Any], analytic: Any) -> Table:
    from lsys.metrics import format_bytes

    table = Table(title="traced vs analytic (Megatron's per-layer formula, s -> s/cp; docs/memory.md explains the gap)",
                  title_justify="left")
    for column in ("", "traced at the peak", "analytic"):
        table.add_column(column, justify="right" if column else "left")
    host = set(traced.get("host_categories", ()))
    rows = [("params", traced["params"], analytic.params),
            ("gathered params", traced["gathered_params"], None),
            ("grads", traced["grads"], analytic.grads),
            ("optimizer", traced["optimizer"], analytic.optimizer),
            ("activations (layers + loss)", traced["activations"], analytic.activations + analytic.output),
            ("temporaries", traced["temporaries"], None),
            ("device total", traced["peak_bytes"], analytic.total)]
    for name, left, right in rows:
        if name in host:  # held in host memory: in the host row, not the device total
            name, right = f"{name} (host)", None
        table.add_row(name, format_bytes(left), "-" if right is None else format_bytes(right))
    table.add_row("traced / analytic", f"{traced['peak_bytes'] / analytic.total:.2f}x", "")
    if traced.get("host_peak_bytes") or analytic.host:
        table.add_row("host (offloaded) peak", format_bytes(traced.get("host_peak_bytes", 0)),
                      format_bytes(analytic.host))
    return table


def _candidates(found: list[Any], budget_gib: float, host_budget_gib: float | None) -> Table:
    from lsys.metrics import format_bytes

    host = "" if host_budget_gib is None else f" and {host_budget_gib:g} GiB of host memory"
    table = Table(title=f"longest sequence within {budget_gib:g} GiB per rank{host} (best first)",
                  title_justify="left")
    for column in ("dp", "ring", "ulysses", "tp", "recompute", "quant", "offload", "state", "MLP tile",
                   "analytic max seq", "traced max seq", "traced peak", "traced host"):
        table.add_column(column, justify="right")
    for c in found:
        d = c.describe()
        line = "" if d["confirmed"] else " (line)"
        table.add_row(str(d["dp"]), str(d["cp_ring"]), str(d["cp_ulysses"]), str(d["tp"]), d["recompute"], d["quant"],
                      d["offload"], "host" if d["fsdp_offload"] != "none" else "device",
                      f"{d['mlp_chunk_tokens']:,}" if d["mlp_chunk_tokens"] else "-", f"{d['analytic_seq_len']:,}",
                      f"{d['traced_seq_len']:,}", format_bytes(d["traced_peak_bytes"]) + line,
                      format_bytes(d["traced_host_bytes"]) + line)
    return table
