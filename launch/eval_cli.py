"""`lsys eval`'s inputs: what each TARGET is (a config file, a run directory, a HuggingFace model directory), and
the grid of `--out` (lengths, depths, samples, buckets, pairs) checked against the run before any rank starts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lsys.config import LsysConfig


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", default=None,
                   help="measure whether the context helps and write DIR/needle.json and .png (needle-in-a-haystack "
                        "accuracy per length x depth), DIR/position_loss.json and .png (loss by position, text "
                        "tasks) and DIR/recall.json and .png (recall by number of pairs, mqar); several TARGETs are "
                        "drawn in the same pictures. Without --out: one JSON line of the task's held-out metric")
    p.add_argument("--lengths", metavar="N,N,...", default=None,
                   help="needle context lengths in tokens (default: a quarter of data.seq_len to twice it, doubling)")
    p.add_argument("--depths", metavar="F,F,...", default=None,
                   help="needle depths as shares of the haystack, 0 (first) to 1 (last) (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, default=16,
                   help="sequences per needle cell, per pairs count and for the position loss (default 16)")
    p.add_argument("--buckets", type=int, default=16, help="position buckets over data.seq_len (default 16)")
    p.add_argument("--pairs", metavar="N,N,...", default=None,
                   help="mqar: numbers of key-value pairs to recall (default 1, 2, 4, ... up to twice the trained "
                        "data.mqar.num_pairs, as many as the length holds)")


def resolve_target(target: str) -> tuple[str | None, list[str]]:
    """TARGET -> (the config file to load, overrides that come before the user's): a run directory (its
    config.yaml, evaluated where it is), a HuggingFace model directory (its weights, no run checkpoint), or a
    config file."""
    path = Path(target)
    if not path.is_dir():
        return target, []
    if (path / "config.yaml").is_file():
        return str(path / "config.yaml"), [f"train.run_dir={target}"]
    if (path / "config.json").is_file():
        return None, [f"model.pretrained={target}", "checkpoint.resume=false"]
    raise ValueError(f"{target}: a directory with neither config.yaml (a run directory) nor config.json (a "
                     "HuggingFace model directory); give one of those, or a config file")


def _numbers(flag: str, text: str, kind: type) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}={text}: give comma-separated {'integers' if kind is int else 'numbers'}, "
                         "e.g. 128,256,512") from None
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}={text}: a value is repeated; give each once")
    return sorted(values)


def grid_from_args(args: argparse.Namespace, cfg: LsysConfig) -> dict[str, Any]:
    """The EvalGrid (as a dict) that `args` ask for on `cfg`'s run; ValueError naming the flag for a bad one."""
    from lsys.context_eval import DEFAULT_DEPTHS, EvalGrid, default_lengths

    granularity = cfg.parallel.seq_granularity
    lengths = (_numbers("--lengths", args.lengths, int) if args.lengths
               else default_lengths(cfg.data.seq_len, granularity))
    for n in lengths:
        if n < granularity or n % granularity:
            raise ValueError(f"--lengths: {n} tokens is not a positive multiple of {granularity}, which this "
                             "layout's context-parallel sharding needs (parallel.seq_granularity); round it")
    depths = _numbers("--depths", args.depths, float) if args.depths else list(DEFAULT_DEPTHS)
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths={args.depths}: depths are shares of the haystack, from 0 to 1")
    if args.samples < 1:
        raise ValueError(f"--samples={args.samples}: evaluate at least one sequence")
    if not 1 <= args.buckets <= cfg.data.seq_len:
        raise ValueError(f"--buckets={args.buckets}: use 1 to data.seq_len={cfg.data.seq_len} buckets")
    pairs = _numbers("--pairs", args.pairs, int) if args.pairs else []
    grid = EvalGrid(lengths=lengths, depths=depths, samples=args.samples, buckets=args.buckets, pairs=pairs)
    _check_tasks(cfg, grid, default_lengths=args.lengths is None, default_pairs=args.pairs is None)
    return vars(grid)


def _check_tasks(cfg: LsysConfig, grid: Any, default_lengths: bool, default_pairs: bool) -> None:
    """Build each needle and recall task the grid asks for, where that is cheap (a synthetic task), so a length
    too short for the needle is refused here, not on a rank; default lengths and pairs keep those that fit."""
    from lsys.data import configured_task, task_options, task_type

    kind = task_type(cfg.data.task)
    if kind.reads_dataset:  # building the task reads the dataset (the ranks' time): its tokenizer says enough
        fixed = kind.needle_tokens(task_options(cfg))
        if default_lengths:
            grid.lengths = [n for n in grid.lengths if n > fixed]
        too_short = [n for n in grid.lengths if n <= fixed]
        if too_short or not grid.lengths:
            raise ValueError(f"--lengths: {', '.join(map(str, too_short)) or 'the defaults'}: the needle sentence, "
                             f"question and answer take up to {fixed} tokens of this dataset's tokenizer; evaluate "
                             f"lengths above {fixed}")
        return
    task = configured_task(cfg)
    if default_lengths:
        grid.lengths = [n for n in grid.lengths if _fits(lambda n=n: task.needle_task(n, 0.0))]
        if not grid.lengths:
            raise ValueError(f"--lengths: the needle does not fit in data.seq_len={cfg.data.seq_len} or twice it; "
                             "give longer lengths")
    for n in grid.lengths:
        try:
            task.needle_task(n, grid.depths[0])
        except ValueError as exc:
            raise ValueError(f"--lengths: {n} tokens: {exc}") from None
    if default_pairs:
        most = 2 * getattr(task, "num_pairs", 0)
        doubling = [1 << k for k in range(most.bit_length()) if (1 << k) <= most]
        grid.pairs = [n for n in doubling if _fits(lambda n=n: task.pairs_task(n))]
        return
    for n in grid.pairs:
        try:
            task.pairs_task(n)
        except ValueError as exc:
            raise ValueError(f"--pairs: {n}: {exc}") from None


def _fits(build: Any) -> bool:
    try:
        build()
    except ValueError:
        return False
    return True
