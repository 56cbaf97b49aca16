"""Did the context help? `lsys eval --out`'s measurements, run on every rank: a needle-in-a-haystack grid (accuracy
per context length x needle depth), loss by position on held-out text, and associative recall by number of pairs.

Every cell is evaluated by the trainer's own model (`lsys.trainer.evaluating_trainer`: the same building,
parallelization, checkpoint choice and context-parallel sharding as training), so a length no single rank holds
is evaluated over ring or Ulysses ranks, and any layout gives the same numbers. Counts are summed over the
data-parallel ranks; every rank returns the same result.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lsys.config import LsysConfig
from lsys.session import distributed_session

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EvalGrid:
    """What to measure. `lengths`: needle haystack lengths in tokens; `depths`: where the needle sits (0: first,
    1: last); `samples`: sequences per needle cell, per pairs count and for the position loss; `buckets`: position
    buckets over data.seq_len; `pairs`: numbers of key-value bindings for associative recall."""

    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples: int = 16
    buckets: int = 16
    pairs: list[int] = field(default_factory=list)


def default_lengths(seq_len: int, granularity: int) -> list[int]:
    """From a quarter of the trained length to twice it, doubling, each a multiple of `granularity`."""
    lengths = [seq_len // 4, seq_len // 2, seq_len, 2 * seq_len]
    return sorted({max(granularity, n // granularity * granularity) for n in lengths})


def needle_grid(trainer: Any, grid: EvalGrid, tick: Any) -> dict[str, Any] | None:
    """Accuracy (and the answers' mean loss) per (length, depth) cell, `grid.samples` needles each; None when the
    task has no needle."""
    if trainer.task.needle_task(grid.lengths[0], grid.depths[0]) is None:
        return None
    correct, sequences, loss = ([[0.0] * len(grid.depths) for _ in grid.lengths] for _ in range(3))
    for i, length in enumerate(grid.lengths):
        for j, depth in enumerate(grid.depths):
            totals = trainer.evaluate_task(trainer.task.needle_task(length, depth), grid.samples)
            correct[i][j], sequences[i][j], loss[i][j] = totals.correct_sequences, totals.sequences, totals.loss
            tick(f"needle {length} tokens, depth {depth:.0%}")
    accuracy = [[c / s if s else math.nan for c, s in zip(cr, sr, strict=True)]
                for cr, sr in zip(correct, sequences, strict=True)]
    return {"lengths": grid.lengths, "depths": grid.depths, "shape": [len(grid.lengths), len(grid.depths)],
            "accuracy": accuracy, "correct": correct, "sequences": sequences, "loss": loss}


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    """`buckets` + 1 position boundaries splitting 0..seq_len into near-equal spans."""
    return [round(seq_len * k / buckets) for k in range(buckets + 1)]


def position_sums(positions: torch.Tensor, token_losses: torch.Tensor, loss_mask: torch.Tensor,
                  edges: list[int]) -> torch.Tensor:
    """positions, token_losses, loss_mask: [B, S] -> [2, buckets] float64: summed loss and targets per bucket of
    positions (a position p is in bucket k when edges[k] <= p < edges[k + 1])."""
    bucket = torch.bucketize(positions.flatten(), torch.tensor(edges[1:-1]), right=True)
    mask = loss_mask.flatten()
    losses = token_losses.detach().to(torch.float64).flatten().masked_fill(~mask, 0.0)
    buckets = len(edges) - 1
    return torch.stack([torch.bincount(bucket, weights=losses, minlength=buckets),
                        torch.bincount(bucket, weights=mask.double(), minlength=buckets)])


def position_loss(trainer: Any, grid: EvalGrid, tick: Any) -> dict[str, Any] | None:
    """Mean loss (and bits per byte) of held-out targets by position in their document, over `grid.samples`
    validation sequences of data.seq_len; None for a task that scores only some positions."""
    task = trainer.task
    if not task.scores_every_position:
        return None
    edges = bucket_edges(task.seq_len, grid.buckets)
    sums = torch.zeros(2, grid.buckets, dtype=torch.float64)
    trainer.model.eval()
    for ids in trainer.eval_shares(grid.samples):
        full = task.batch(ids, split="valid")
        _, token_losses = trainer.predict(full)
        sums += position_sums(full.positions, token_losses, full.loss_mask, edges)
    trainer.model.train()
    summed = sums.to(trainer.device)
    dist.all_reduce(summed, group=trainer.mesh.dp_group)
    loss_sum, tokens = summed.cpu().tolist()
    tick("position loss")
    loss = [s / n if n else math.nan for s, n in zip(loss_sum, tokens, strict=True)]
    bits = [x / math.log(2.0) / task.bytes_per_token if task.bytes_per_token else math.nan for x in loss]
    return {"seq_len": task.seq_len, "edges": edges, "loss": loss, "bits_per_byte": bits, "tokens": tokens}


def recall_by_pairs(trainer: Any, grid: EvalGrid, tick: Any) -> dict[str, Any] | None:
    """Recall accuracy per number of key-value pairs; None for a task without bindings."""
    if not grid.pairs or trainer.task.pairs_task(grid.pairs[0]) is None:
        return None
    recall = []
    for pairs in grid.pairs:
        totals = trainer.evaluate_task(trainer.task.pairs_task(pairs), grid.samples)
        recall.append(totals.metric("recall_accuracy"))
        tick(f"recall with {pairs} pairs")
    return {"pairs": grid.pairs, "recall_accuracy": recall}


def steps_of(trainer: Any, grid: EvalGrid) -> int:
    """Progress steps `run_grid` will take (its `tick` calls)."""
    needle = trainer.task.needle_task(grid.lengths[0], grid.depths[0]) is not None
    pairs = bool(grid.pairs) and trainer.task.pairs_task(grid.pairs[0]) is not None
    return (needle * len(grid.lengths) * len(grid.depths) + trainer.task.scores_every_position
            + pairs * len(grid.pairs))


def run_grid(cfg: LsysConfig, grid: dict[str, Any]) -> dict[str, Any]:
    """Every measurement of `grid` (an EvalGrid as a dict) on this rank; -> the same result on every rank."""
    from lsys.context_report import GridProgress
    from lsys.trainer import evaluating_trainer

    plan = EvalGrid(**grid)
    with distributed_session(cfg.train.device, cfg.train.collective_timeout_s) as session:
        trainer, step = evaluating_trainer(cfg, session)
        started = time.perf_counter()
        with GridProgress(session.is_main, steps_of(trainer, plan)) as progress:
            result = {"step": step, "seq_len": cfg.data.seq_len, "world_size": session.world_size,
                      "layout": {"dp": trainer.mesh.dp_size, "cp": trainer.mesh.cp_size, "tp": trainer.mesh.tp_size},
                      "needle": needle_grid(trainer, plan, progress.tick),
                      "position_loss": position_loss(trainer, plan, progress.tick),
                      "recall": recall_by_pairs(trainer, plan, progress.tick)}
        return {**result, "grid": asdict(plan), "eval_wall_s": time.perf_counter() - started}


def run_grid_from_dict(values: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """Entry point for spawned ranks: configs travel as plain dicts."""
    from lsys.config import config_from_dict

    return run_grid(config_from_dict(values), grid)
