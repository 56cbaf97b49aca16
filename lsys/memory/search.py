"""The longest sequence that fits a per-rank memory budget (`lsys plan --budget-gib [--host-budget-gib]`).

Candidates are every way to tile the world with the parallel degrees (ring x Ulysses x tensor x data parallel,
heads split whole), times recomputation (none, selective, full), stored activations (16-bit, int8) and the
feed-forward tiled or not (model.mlp_chunk_tokens, MLP_CHUNK_TOKENS unless the config sets it); with a host
budget also activation offload (recompute.offload) and the model state in host memory (parallel.fsdp_offload).
Device and host memory both grow linearly with the sequence for a fixed layout (flash attention stores no score
matrix), so:
  1. the analytic estimate gives each candidate's longest sequence at once (the shorter of the device's and the
     host's), and ranks them (one per class of data/tensor degree and memory options: it cannot tell ring from
     Ulysses);
  2. the best few are traced at that length and at half of it: two points give the traced lines, device and
     host, which give the traced longest sequence (these traces are independent: they run side by side in
     child processes, one per core);
  3. the winner is traced once more at its length to confirm it fits.
Data parallelism is bounded by train.global_batch_size (each replica needs whole sequences).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any

from lsys.config import LsysConfig, config_from_dict, ffn_hidden_size, to_dict
from lsys.memory.analytic import analytic_estimate
from lsys.memory.trace import trace_rank
from lsys.validation import validate
from parallel.config import check_model_split

RECOMPUTE_COST = {"none": 0, "selective": 1, "full": 2}  # extra compute, for ordering equally long candidates
MLP_CHUNK_TOKENS = 8192  # the feed-forward tile tried when the config has none (a tile of this size keeps matmuls long)
GIB = 1024**3
CONFIRM_ATTEMPTS = 3
NODE_GPUS = 8
# What a search reports as each trace starts and once when done: what it traces, traces done (started, when
# several run at once), traces planned; "" for what: only the count moved (a trace running alongside finished).
Progress = Callable[[str, int, int], None]


@dataclass
class Budget:
    """Bytes per rank: on the device, and in host memory (None: nothing may be offloaded)."""

    device: int
    host: int | None = None


@dataclass
class Candidate:
    cfg: LsysConfig
    analytic_seq_len: int
    traced_seq_len: int = 0
    traced_peak_bytes: int = 0
    traced_host_bytes: int = 0
    confirmed: bool = False

    def describe(self) -> dict:
        c = self.cfg
        p = c.parallel
        return {"dp": p.dp, "cp_ring": p.cp_ring, "cp_ulysses": p.cp_ulysses, "tp": p.tp,
                "recompute": c.recompute.mode, "quant": c.quant.activations, "offload": c.recompute.offload,
                "fsdp_offload": p.fsdp_offload, "mlp_chunk_tokens": c.model.mlp_chunk_tokens,
                "analytic_seq_len": self.analytic_seq_len, "traced_seq_len": self.traced_seq_len,
                "traced_peak_bytes": self.traced_peak_bytes, "traced_host_bytes": self.traced_host_bytes,
                "confirmed": self.confirmed}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: LsysConfig, world_size: int, host: bool = False) -> list[LsysConfig]:
    """Every valid (degrees, recompute, quant, tiling; with `host` offload too) variant of `cfg` on `world_size`
    ranks (sequence length unset)."""
    m, found = cfg.model, []
    tiles = (m.mlp_chunk_tokens,) if m.mlp_chunk_tokens else (0, MLP_CHUNK_TOKENS)
    states = ("none", "cpu") if host else (cfg.parallel.fsdp_offload,)
    widths = {"hidden_size": m.hidden_size, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
              "ffn_hidden_size": ffn_hidden_size(m)}
    for tp in _divisors(world_size):
        for ulysses in _divisors(world_size // tp):
            for ring in _divisors(world_size // (tp * ulysses)):
                dp = world_size // (tp * ulysses * ring)
                splits = _accepts(check_model_split, **widths, cp_ulysses=ulysses, tp=tp)
                if cfg.train.global_batch_size % dp or not splits:
                    continue
                for mode, state, tile in itertools.product(RECOMPUTE_COST, states, tiles):
                    parallel = replace(cfg.parallel, dp=dp, cp_ring=ring, cp_ulysses=ulysses, tp=tp,
                                       fsdp_offload=state)
                    # Offload moves what recomputation keeps; without it there is nothing to move.
                    offloads = ("none", "cpu") if host and mode != "none" else ("none",)
                    # int8 compresses what a block stores; full recomputation stores only the block's input
                    for quant, offload in itertools.product(("none",) if mode == "full" else ("none", "int8"),
                                                            offloads):
                        found.append(replace(cfg, parallel=parallel, model=replace(m, mlp_chunk_tokens=tile),
                                             recompute=replace(cfg.recompute, mode=mode, offload=offload),
                                             quant=replace(cfg.quant, activations=quant)))
    return found


def with_seq_len(cfg: LsysConfig, seq_len: int) -> LsysConfig:
    return replace(cfg, data=replace(cfg.data, seq_len=seq_len))


def _longest(intercept: float, slope: float, budget: int, step: int) -> int:
    return int((budget - intercept) / slope // step * step) if slope > 0 and budget > intercept else 0


def _fitting(near: int, far: int, device: tuple[int, int], host: tuple[int, int], budget: Budget,
             step: int) -> int:
    """The longest multiple of `step` under the budget, from the (near, far) points of the device and the host
    lines (bytes at `near` and `far` tokens); 0 when nothing fits."""
    if budget.host is None and host[1] > 0:
        return 0  # it offloads, but no host memory was offered
    limits = [(device, budget.device)] + ([(host, budget.host)] if budget.host is not None else [])
    longest = []
    for (low, high), limit in limits:
        slope = (high - low) / (far - near)
        if slope <= 0:  # does not grow with the sequence (the host's state alone): it fits or it does not
            if high > limit:
                return 0
            continue
        longest.append(_longest(high - slope * far, slope, limit, step))
    return min(longest, default=0)


def _analytic_longest(cfg: LsysConfig, world_size: int, vocab: int, budget: Budget) -> int:
    step = cfg.parallel.seq_granularity
    # Two lengths past the loss chunk (beyond it the chunked loss no longer grows): the estimate is a line there.
    near = step * math.ceil(max(2 * cfg.train.loss_chunk_tokens * cfg.parallel.cp, step) / step)
    low, high = (analytic_estimate(with_seq_len(cfg, n), world_size, vocab) for n in (near, 2 * near))
    return _fitting(near, 2 * near, (low.total, high.total), (low.host, high.host), budget, step)


def _accepts(check: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
    """Whether `check(*args, **kwargs)` passes; the search only needs to know, not why."""
    try:
        check(*args, **kwargs)
    except ValueError:
        return False
    return True


def _peaks(values: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(device peak, host peak) bytes of one rank of the config `values` (a child process's job)."""
    usage = trace_rank(config_from_dict(values), world_size)
    return usage.peak_bytes, usage.host_peak_bytes


class _Traces:
    """The search's traces, counted for its progress report: two per candidate and one to confirm (more when
    the winner steps down). Several at once run in child processes, at most `workers` of them."""

    def __init__(self, world_size: int, progress: Progress, planned: int, workers: int):
        self.world_size, self.progress, self.planned, self.done = world_size, progress, planned, 0
        self.workers = workers

    def peak(self, cfg: LsysConfig, seq_len: int, what: str) -> tuple[int, int]:
        """(device peak, host peak) bytes of one rank at `seq_len`, traced in this process."""
        self.planned = max(self.planned, self.done + 1)
        self.progress(what, self.done, self.planned)
        peaks = _peaks(to_dict(with_seq_len(cfg, seq_len)), self.world_size)
        self.done += 1
        return peaks

    def peaks(self, jobs: list[tuple[LsysConfig, int, str]]) -> list[tuple[int, int]]:
        """`peak` of each (cfg, seq_len, what), side by side. Each child traces in a fresh interpreter (spawn:
        a fake process group of its own, nothing inherited from this one's torch state)."""
        workers = min(self.workers, len(jobs))
        if workers <= 1:
            return [self.peak(*job) for job in jobs]
        for offset, (_, _, what) in enumerate(jobs):
            self.progress(f"{what} ({workers} at a time)", self.done + offset, self.planned)
        results: list[tuple[int, int]] = [(0, 0)] * len(jobs)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_peaks, to_dict(with_seq_len(cfg, n)), self.world_size): i
                       for i, (cfg, n, _) in enumerate(jobs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                self.done += 1
                self.progress("", self.done, self.planned)
        return results

    def finished(self) -> None:
        self.progress("done", self.done, self.done)


def search(cfg: LsysConfig, world_size: int, budget: Budget, vocab: int, top: int = 3,
           progress: Progress = lambda what, done, planned: None, workers: int | None = None) -> list[Candidate]:
    """The `top` candidates with the longest traced sequence under the per-rank `budget`, best first; their
    traces run `workers` at a time (default: one per core this process may use).
    Raises ValueError when no layout fits even the shortest sequence."""
    ranked, variants = [], layouts(cfg, world_size, host=budget.host is not None)
    for variant in variants:
        longest = _analytic_longest(variant, world_size, vocab, budget)
        if longest and _accepts(validate, with_seq_len(variant, longest), world_size):
            ranked.append(Candidate(variant, longest))
    if not ranked:
        smallest = min((analytic_estimate(with_seq_len(v, 0), world_size, vocab).total for v in variants), default=0)
        raise ValueError(f"--budget-gib {budget.device / GIB:g}: no layout of {world_size} ranks fits even the "
                         f"shortest sequence; the model state alone needs {smallest / GIB:.2f} GiB per rank at best. "
                         "Raise the budget or the number of ranks, or give host memory to offload to "
                         "(--host-budget-gib)")
    ranked.sort(key=_preference)
    chosen, classes = [], set()
    for candidate in ranked:  # one per class: the analytic estimate does not tell ring from Ulysses
        c = candidate.cfg
        key = (c.parallel.dp, c.parallel.tp, c.recompute.mode, c.quant.activations, c.recompute.offload,
               c.parallel.fsdp_offload, c.model.mlp_chunk_tokens)
        if key not in classes and len(chosen) < top:
            classes.add(key)
            chosen.append(candidate)
    traces = _Traces(world_size, progress, 2 * len(chosen) + 1, workers or len(os.sched_getaffinity(0)))
    _trace_lines(chosen, budget, traces)
    chosen.sort(key=lambda c: (-c.traced_seq_len, _cost(c.cfg)))
    _confirm(chosen[0], budget, traces)
    traces.finished()
    if not chosen[0].confirmed:
        raise ValueError(f"--budget-gib {budget.device / GIB:g}: the traced memory of the best layouts exceeds the "
                         "budget even at the shortest sequence; raise the budget or the number of ranks")
    return chosen


def _cost(cfg: LsysConfig) -> tuple:
    """What a layout costs besides memory, for ordering equally long candidates: recomputation, then copies to
    and from the host, then int8 rounding, then smaller feed-forward matmuls."""
    return (RECOMPUTE_COST[cfg.recompute.mode], cfg.recompute.offload != "none", cfg.parallel.fsdp_offload != "none",
            cfg.quant.activations != "none", cfg.model.mlp_chunk_tokens != 0)


def _preference(candidate: Candidate) -> tuple:
    """Longest analytic sequence first; then less recomputation, no quantization, less tensor parallelism, and
    Ulysses over the (at most 8) GPUs of a node with the ring across nodes, the usual hybrid layout."""
    p = candidate.cfg.parallel
    return (-candidate.analytic_seq_len, *_cost(candidate.cfg), p.tp, p.cp_ulysses * p.tp > NODE_GPUS,
            -p.cp_ulysses)


def _trace_lines(chosen: list[Candidate], budget: Budget, traces: _Traces) -> None:
    """Trace each candidate at its analytic length and half of it; the lines through both (device and host)
    give its traced longest sequence."""
    points, jobs = [], []
    for index, candidate in enumerate(chosen):
        step = candidate.cfg.parallel.seq_granularity
        far = max(2 * step, candidate.analytic_seq_len)
        near = max(step, far // 2 // step * step)
        points.append((far, near))
        what = f"candidate {index + 1}/{len(chosen)} ({_layout(candidate.cfg)})"
        jobs += [(candidate.cfg, far, f"{what} at {far:,} tokens"), (candidate.cfg, near, f"{what} at {near:,} tokens")]
    peaks = traces.peaks(jobs)
    for index, (candidate, (far, near)) in enumerate(zip(chosen, points, strict=True)):
        high, low = peaks[2 * index], peaks[2 * index + 1]
        step = candidate.cfg.parallel.seq_granularity
        longest = _fitting(near, far, (low[0], high[0]), (low[1], high[1]), budget, step)
        candidate.traced_seq_len = longest
        candidate.traced_peak_bytes, candidate.traced_host_bytes = (
            round(h + (h - lo) / (far - near) * (longest - far)) for lo, h in zip(low, high, strict=True))


def _layout(cfg: LsysConfig) -> str:
    p = cfg.parallel
    extras = [f"{name} offload" for name, on in (("activation", cfg.recompute.offload != "none"),
                                                 ("state", p.fsdp_offload != "none")) if on]
    if cfg.model.mlp_chunk_tokens:
        extras.append(f"MLP tiles of {cfg.model.mlp_chunk_tokens:,}")
    return (f"dp {p.dp} x ring {p.cp_ring} x ulysses {p.cp_ulysses} x tp {p.tp}, {cfg.recompute.mode} recompute, "
            f"{cfg.quant.activations} activations" + "".join(f", {e}" for e in extras))


def _confirm(candidate: Candidate, budget: Budget, traces: _Traces) -> None:
    """Trace the winner at its length; step down while it does not fit (the lines are exact up to rounding)."""
    step = candidate.cfg.parallel.seq_granularity
    for _ in range(CONFIRM_ATTEMPTS):
        if candidate.traced_seq_len < step:
            return
        device, host = traces.peak(candidate.cfg, candidate.traced_seq_len,
                                   f"confirming {candidate.traced_seq_len:,} tokens")
        candidate.traced_peak_bytes, candidate.traced_host_bytes = device, host
        if device <= budget.device and (budget.host is None or host <= budget.host):
            candidate.confirmed = True
            return
        candidate.traced_seq_len -= step
