"""The longest sequence that fits a per-rank memory budget (`lsys plan --budget-gib`).

Candidates are every way to tile the world with the parallel degrees (ring x Ulysses x tensor x data parallel,
heads split whole), times recomputation (none, selective, full) and stored activations (16-bit, int8). Memory
grows linearly with the sequence for a fixed layout (flash attention stores no score matrix), so:
  1. the analytic estimate gives each candidate's longest sequence at once, and ranks them (one per class of
     data/tensor degree, recomputation and quantization: it cannot tell ring from Ulysses);
  2. the best few are traced at that length and at half of it: two points give the traced line, which gives the
     traced longest sequence;
  3. the winner is traced once more at its length to confirm it fits.
Data parallelism is bounded by train.global_batch_size (each replica needs whole sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lsys.config import LsysConfig, ffn_hidden_size, validate
from lsys.memory.analytic import analytic_estimate
from lsys.memory.trace import trace_rank
from parallel.config import check_model_split

RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}  # extra compute, for ordering equally long candidates
GIB = 1024**3
CONFIRM_ATTEMPTS = 3
NODE_GPUS = 8
# What a search reports before each trace and once when done: what it traces, traces done, traces planned.
Progress = Callable[[str, int, int], None]


@dataclass
class Candidate:
    cfg: LsysConfig
    analytic_seq_len: int
    traced_seq_len: int = 0
    traced_peak_bytes: int = 0
    confirmed: bool = False

    def describe(self) -> dict:
        p = self.cfg.parallel
        return {"dp": p.dp, "cp_ring": p.cp_ring, "cp_ulysses": p.cp_ulysses, "tp": p.tp,
                "recompute": self.cfg.recompute.mode, "quant": self.cfg.quant.activations,
                "analytic_seq_len": self.analytic_seq_len, "traced_seq_len": self.traced_seq_len,
                "traced_peak_bytes": self.traced_peak_bytes, "confirmed": self.confirmed}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: LsysConfig, world_size: int) -> list[LsysConfig]:
    """Every valid (degrees, recompute, quant) variant of `cfg` on `world_size` ranks (sequence length unset)."""
    m, found = cfg.model, []
    widths = {"hidden_size": m.hidden_size, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
              "ffn_hidden_size": ffn_hidden_size(m)}
    for tp in _divisors(world_size):
        for ulysses in _divisors(world_size // tp):
            for ring in _divisors(world_size // (tp * ulysses)):
                dp = world_size // (tp * ulysses * ring)
                splits = _accepts(check_model_split, **widths, cp_ulysses=ulysses, tp=tp)
                if cfg.train.global_batch_size % dp or not splits:
                    continue
                parallel = replace(cfg.parallel, dp=dp, cp_ring=ring, cp_ulysses=ulysses, tp=tp)
                for mode in RECOMPUTE_COST:
                    # int8 compresses what a block stores; full recomputation stores only the block's input
                    for quant in ("none",) if mode == "full" else ("none", "int8"):
                        found.append(replace(cfg, parallel=parallel, recompute=replace(cfg.recompute, mode=mode),
                                             quant=replace(cfg.quant, activations=quant)))
    return found


def with_seq_len(cfg: LsysConfig, seq_len: int) -> LsysConfig:
    return replace(cfg, data=replace(cfg.data, seq_len=seq_len))


def _longest(intercept: float, slope: float, budget: int, step: int) -> int:
    return int((budget - intercept) / slope // step * step) if slope > 0 and budget > intercept else 0


def _analytic_longest(cfg: LsysConfig, world_size: int, vocab: int, budget: int) -> int:
    step = cfg.parallel.seq_granularity
    # Two lengths past the loss chunk (beyond it the chunked loss no longer grows): the estimate is a line there.
    near = step * math.ceil(max(2 * cfg.train.loss_chunk_tokens * cfg.parallel.cp, step) / step)
    low = analytic_estimate(with_seq_len(cfg, near), world_size, vocab).total
    slope = (analytic_estimate(with_seq_len(cfg, 2 * near), world_size, vocab).total - low) / near
    return _longest(low - slope * near, slope, budget, step)


def _accepts(check: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
    """Whether `check(*args, **kwargs)` passes; the search only needs to know, not why."""
    try:
        check(*args, **kwargs)
    except ValueError:
        return False
    return True


class _Traces:
    """The search's traces, counted for its progress report: two per candidate and one to confirm (more when
    the winner steps down)."""

    def __init__(self, world_size: int, progress: Progress, planned: int):
        self.world_size, self.progress, self.planned, self.done = world_size, progress, planned, 0

    def peak(self, cfg: LsysConfig, seq_len: int, what: str) -> int:
        self.planned = max(self.planned, self.done + 1)
        self.progress(what, self.done, self.planned)
        peak = trace_rank(with_seq_len(cfg, seq_len), self.world_size).peak_bytes
        self.done += 1
        return peak

    def finished(self) -> None:
        self.progress("done", self.done, self.done)


def search(cfg: LsysConfig, world_size: int, budget_bytes: int, vocab: int, top: int = 3,
           progress: Progress = lambda what, done, planned: None) -> list[Candidate]:
    """The `top` candidates with the longest traced sequence under `budget_bytes` per rank, best first.
    Raises ValueError when no layout fits even the shortest sequence."""
    ranked, variants = [], layouts(cfg, world_size)
    for variant in variants:
        longest = _analytic_longest(variant, world_size, vocab, budget_bytes)
        if longest and _accepts(validate, with_seq_len(variant, longest), world_size):
            ranked.append(Candidate(variant, longest))
    if not ranked:
        smallest = min((analytic_estimate(with_seq_len(v, 0), world_size, vocab).total for v in variants), default=0)
        raise ValueError(f"--budget-gib {budget_bytes / GIB:g}: no layout of {world_size} ranks fits even the shortest "
                         f"sequence; the model state alone needs {smallest / GIB:.2f} GiB per rank at best. Raise "
                         "the budget or the number of ranks, or offload the optimizer (optim.offload=cpu)")
    ranked.sort(key=_preference)
    chosen, classes = [], set()
    for candidate in ranked:  # one per class: the analytic estimate does not tell ring from Ulysses
        p = candidate.cfg.parallel
        key = (p.dp, p.tp, candidate.cfg.recompute.mode, candidate.cfg.quant.activations)
        if key not in classes and len(chosen) < top:
            classes.add(key)
            chosen.append(candidate)
    traces = _Traces(world_size, progress, 2 * len(chosen) + 1)
    for index, candidate in enumerate(chosen):
        _trace_line(candidate, budget_bytes, traces, f"{index + 1}/{len(chosen)}")
    chosen.sort(key=lambda c: (-c.traced_seq_len, RECOMPUTE_COST[c.cfg.recompute.mode]))
    _confirm(chosen[0], budget_bytes, traces)
    traces.finished()
    if not chosen[0].confirmed:
        raise ValueError(f"--budget-gib {budget_bytes / GIB:g}: the traced memory of the best layouts exceeds the "
                         "budget even at the shortest sequence; raise the budget or the number of ranks")
    return chosen


def _preference(candidate: Candidate) -> tuple:
    """Longest analytic sequence first; then less recomputation, no quantization, less tensor parallelism, and
    Ulysses over the (at most 8) GPUs of a node with the ring across nodes, the usual hybrid layout."""
    p = candidate.cfg.parallel
    return (-candidate.analytic_seq_len, RECOMPUTE_COST[candidate.cfg.recompute.mode],
            candidate.cfg.quant.activations != "none", p.tp, p.cp_ulysses * p.tp > NODE_GPUS, -p.cp_ulysses)


def _trace_line(candidate: Candidate, budget: int, traces: _Traces, label: str) -> None:
    """Trace at the analytic length and half of it; the line through both gives the traced longest sequence."""
    step = candidate.cfg.parallel.seq_granularity
    far = max(2 * step, candidate.analytic_seq_len)
    near = max(step, far // 2 // step * step)
    what = f"candidate {label} ({_layout(candidate.cfg)})"
    high = traces.peak(candidate.cfg, far, f"{what} at {far:,} tokens")
    low = traces.peak(candidate.cfg, near, f"{what} at {near:,} tokens")
    slope = (high - low) / (far - near)
    candidate.traced_seq_len = _longest(high - slope * far, slope, budget, step)
    candidate.traced_peak_bytes = round(high + slope * (candidate.traced_seq_len - far))


def _layout(cfg: LsysConfig) -> str:
    p = cfg.parallel
    return (f"dp {p.dp} x ring {p.cp_ring} x ulysses {p.cp_ulysses} x tp {p.tp}, {cfg.recompute.mode} recompute, "
            f"{cfg.quant.activations} activations")


def _confirm(candidate: Candidate, budget: int, traces: _Traces) -> None:
    """Trace the winner at its length; step down while it does not fit (the line is exact up to rounding)."""
    step = candidate.cfg.parallel.seq_granularity
    for _ in range(CONFIRM_ATTEMPTS):
        if candidate.traced_seq_len < step:
            return
        peak = traces.peak(candidate.cfg, candidate.traced_seq_len,
                           f"confirming {candidate.traced_seq_len:,} tokens")
        candidate.traced_peak_bytes = peak
        if peak <= budget:
            candidate.confirmed = True
            return
        candidate.traced_seq_len -= step
