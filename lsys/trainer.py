"""The training loop. Every rank runs `train(cfg)`; the launcher only decides how ranks are started.

Data: sample ids are a pure function of (step, position in the global batch), so any number of ranks
sees the same global batch, and a resumed run sees exactly the batches it would have seen.
Loss: per-token cross-entropy summed locally and divided by the GLOBAL number of trained tokens; replica
gradients are summed. The result is the exact gradient of the global mean loss for any dp/cp split.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lsys.checkpoint import checkpoint_root, load_checkpoint, save_checkpoint
from lsys.checkpoint_verify import model_shape, resume_messages, run_layout, select_checkpoint
from lsys.config import LsysConfig, save_config, to_dict
from lsys.data import Batch, EvalTotals, Task, configured_task, model_vocabulary
from lsys.metrics import MetricsWriter, PeakMemory, ProgressView, resident_bytes
from lsys.model import Transformer, count_parameters
from lsys.optim import OptimizerStore, build_optimizer, local_shard, state_bytes
from lsys.session import Session, distributed_session
from lsys.sharding import gather_sequence, shard_batch
from lsys.step import StepWork, torch_dtype
from lsys.tracking import RunTracking
from lsys.validation import validate_for_world
from lsys.weights import materialize
from parallel.mesh import build_mesh
from parallel.parallelize import parallelize


def learning_rate(cfg: LsysConfig, step: int) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step (0-based `step`)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def sequence_length(cfg: LsysConfig, step: int, granularity: int) -> int:
    """Training length at `step`: geometric growth from data.curriculum.start_len to data.seq_len, rounded
    down to a multiple of `granularity` (what context-parallel sharding needs), never below it."""
    c, full = cfg.data.curriculum, cfg.data.seq_len
    if not c.start_len or step >= c.steps:
        return full
    length = c.start_len * (full / c.start_len) ** (step / c.steps)
    return max(granularity, min(full, int(length) // granularity * granularity))


class NonFiniteGuard:
    """train.nonfinite: what happens after a step whose loss or gradient norm is not finite (its update was
    already skipped by `Trainer.train_step`). Returns the message that ends the run, or None to go on."""

    def __init__(self, policy: str, max_in_a_row: int):
        self.policy = policy
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # steps skipped in this run
        self.in_a_row = 0

    def check(self, step: int, record: dict[str, Any]) -> str | None:
        if record["finite"]:
            self.in_a_row = 0
            return None
        self.skipped += 1
        self.in_a_row += 1
        what = f"step {step}: loss {record['loss']} and gradient norm {record['grad_norm']}"
        if self.policy == "stop":
            return (f"lsys: stopped at {what}: not finite, so the weights were not updated and nothing was "
                    "checkpointed (train.nonfinite=stop). Lower train.lr or check the data, then run again: it "
                    "resumes from the last checkpoint (train.nonfinite=skip skips such steps instead)")
        if self.in_a_row >= self.max_in_a_row:
            return (f"lsys: stopped at {what}: {self.in_a_row} non-finite steps in a row "
                    f"(train.nonfinite_max_skips={self.max_in_a_row}); the weights are those of the last finite "
                    "step and nothing was checkpointed since. Lower train.lr or check the data")
        return None

    @staticmethod
    def weights_not_finite(step: int) -> str:
        return (f"lsys: stopped after step {step}: the weights are not finite, so no checkpoint was written; "
                "lower train.lr and resume from the last checkpoint")


class Trainer:
    def __init__(self, cfg: LsysConfig, session: Session, optimizer_store: OptimizerStore | None = None):
        self.cfg = cfg
        self.session = session
        self.device = session.device
        torch.manual_seed(cfg.train.seed)
        self.mesh = build_mesh(cfg.parallel, self.device.type)
        self.task = configured_task(cfg)
        self.model_cfg = replace(cfg.model, vocab_size=model_vocabulary(cfg, self.task.vocab_size))
        # Built without memory, parallelized, then each rank fills only its shards (lsys.weights).
        with torch.device("meta"):
            self.model = Transformer(self.model_cfg).to(torch_dtype(cfg.train.param_dtype))
        parallelize(self.model, cfg.parallel, self.mesh, cfg.recompute, cfg.quant,
                    compute_dtype=torch_dtype(cfg.train.compute_dtype))
        # With parallel.fsdp_offload the shards live in host memory; FSDP2 copies each unit in when it computes.
        state_device = torch.device("cpu") if cfg.parallel.fsdp_offload != "none" else self.device
        materialize(self.model, state_device, seed=cfg.train.seed, pretrained=self.model_cfg.pretrained)
        self.optimizer = build_optimizer(cfg, self.model, optimizer_store)
        self.work = StepWork(cfg, self.model, self.optimizer, self.device, self.task.document_masks)
        local_batch = cfg.train.global_batch_size // self.mesh.dp_size
        self.local_batch = local_batch
        self.micro_batch = cfg.train.micro_batch_size or local_batch
        self.granularity = cfg.parallel.seq_granularity
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_root = checkpoint_root(self.run_dir)

    # -- one step ---------------------------------------------------------------------------------------

    def _micro_batches(self, step: int) -> list[Batch]:
        first = step * self.cfg.train.global_batch_size + self.mesh.dp_rank * self.local_batch
        ids = list(range(first, first + self.local_batch))
        length = sequence_length(self.cfg, step, self.granularity)
        # Each task shortens its own sequences for the curriculum (see Task.batch_of_length).
        batches = [self.task.batch_of_length(ids[i:i + self.micro_batch], length)
                   for i in range(0, self.local_batch, self.micro_batch)]
        return [shard_batch(b, self.mesh, self.cfg.parallel.cp_layout) for b in batches]

    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        micro_batches = self._micro_batches(step)
        local_tokens = sum(b.loss_mask.sum() for b in micro_batches).to(torch.float64)
        counts = local_tokens.reshape(1).to(self.device)
        dist.all_reduce(counts, group=self.mesh.replica_group)
        global_tokens = max(counts.item(), 1.0)  # a step with no trained token contributes zero, not NaN
        lr = learning_rate(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = self.work.accumulate_gradients(micro_batches, global_tokens)
        dist.all_reduce(loss_sum, group=self.mesh.replica_group)
        grad_norm = self.work.clip_gradients()
        # Both are global (summed over the replicas, the norm over every shard): every rank decides alike.
        loss, norm = loss_sum.item() / global_tokens, float(grad_norm)
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            self.work.apply_update(grad_norm)
        else:
            self.work.discard_update()
        elapsed = time.perf_counter() - t0
        length = micro_batches[0].tokens.shape[1] * self.mesh.cp_size
        tokens = self.cfg.train.global_batch_size * length
        return {"loss": loss, "lr": lr, "grad_norm": norm, "seq_len": length, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "finite": finite}

    def _weights_finite(self) -> bool:
        """Whether every parameter on every rank is finite (checked before a checkpoint is written)."""
        local = all(bool(torch.isfinite(local_shard(p)).all()) for p in self.model.parameters())
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # -- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metric of the task over train.eval_samples validation sequences, split over dp ranks."""
        totals = self.evaluate_task(self.task, self.cfg.train.eval_samples)
        return {"loss": totals.loss, self.task.metric_name: totals.metric(self.task.metric_name)}

    def eval_shares(self, num_samples: int) -> list[list[int]]:
        """This data-parallel rank's share of sample ids 0..num_samples-1, in micro-batches."""
        ids = list(range(self.mesh.dp_rank, num_samples, self.mesh.dp_size))
        return [ids[i:i + self.micro_batch] for i in range(0, len(ids), self.micro_batch)]

    @torch.no_grad()
    def predict(self, full: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """full: [B, S], the same on every rank of a context-parallel group -> argmax predictions [B, S] int64 and
        per-token losses [B, S], gathered whole on every such rank (CPU). Call with the model in eval mode."""
        layout = self.cfg.parallel.cp_layout
        local = shard_batch(full, self.mesh, layout)
        losses, predictions = self.work.token_losses(local)
        return (gather_sequence(predictions, local, self.mesh, layout).cpu(),
                gather_sequence(losses, local, self.mesh, layout).cpu())

    @torch.no_grad()
    def evaluate_task(self, task: Task, num_samples: int, split: str = "valid") -> EvalTotals:
        """`task`'s totals over samples 0..num_samples-1 of `split`, summed over the data-parallel ranks (every
        rank gets them). Any task the model's vocabulary covers: the needle grid of `lsys eval` passes its own."""
        self.model.eval()
        totals = EvalTotals()
        for ids in self.eval_shares(num_samples):
            full = task.batch(ids, split=split)
            predictions, token_losses = self.predict(full)
            totals = totals + task.eval_totals(full, predictions, token_losses)
        summed = totals.to_tensor().to(self.device)
        dist.all_reduce(summed, group=self.mesh.dp_group)
        self.model.train()
        return EvalTotals.from_tensor(summed.cpu())

    # -- the run ----------------------------------------------------------------------------------------

    def _peak_memory_per_rank(self, mine_bytes: int) -> list[int]:
        mine = torch.tensor([mine_bytes], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.session.world_size)]
        dist.all_gather(every, mine)
        return [int(x.item()) for x in every]

    def _save(self, step: int) -> None:
        save_checkpoint(self.ckpt_root, step, self.model, self.optimizer, self.cfg.checkpoint.keep_last,
                        shape=model_shape(self.model_cfg), layout=run_layout(self.cfg, self.session.world_size),
                        config=to_dict(self.cfg))

    def _resume(self, doing: str = "resuming") -> int:
        """Collective: load the newest usable checkpoint and return its step (0: none, start fresh). Rank 0 alone
        verifies (hashing reads every file) and broadcasts its choice, so every rank loads the same checkpoint or
        raises the same ValueError (checkpoints exist but none is usable)."""
        if not self.cfg.checkpoint.resume:
            return 0
        chosen: list[str | None] = [None, None]  # the checkpoint to load, or why none may be loaded
        if self.session.is_main:
            try:
                selection = select_checkpoint(self.ckpt_root, model_shape(self.model_cfg),
                                              run_layout(self.cfg, self.session.world_size))
                for line in resume_messages(selection, to_dict(self.cfg), doing):
                    print(line, file=sys.stderr, flush=True)
                chosen[0] = str(selection.path) if selection.path else None
            except ValueError as exc:
                chosen[1] = str(exc)
        dist.broadcast_object_list(chosen, src=0)
        path, error = chosen
        if error:
            raise ValueError(error)
        return load_checkpoint(Path(path), self.model, self.optimizer) if path else 0

    def _maybe_fail(self, step: int) -> None:
        """train.fail_at_step: die like a lost machine (no exception, no cleanup), or kill the optimizer's actor,
        once per run directory; the marker is written first so the restarted run goes past this step."""
        t = self.cfg.train
        if step + 1 != t.fail_at_step or self.session.rank != t.fail_rank:
            return
        marker = self.run_dir / f"injected_failure_step{t.fail_at_step}_rank{t.fail_rank}"
        if marker.exists():
            return
        what = "its optimizer's actor is killed" if t.fail_target == "optimizer" else "it exits"
        marker.write_text(f"rank {t.fail_rank}: {what} on purpose before step {t.fail_at_step}\n")
        print(f"lsys: train.fail_at_step={t.fail_at_step}: rank {t.fail_rank}: {what} now", file=sys.stderr, flush=True)
        if t.fail_target == "optimizer":
            self.optimizer.store.fail()
        else:
            os._exit(17)

    def run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.session.is_main
        start = self._resume()
        end = cfg.train.exit_at_step or cfg.train.steps
        writer = MetricsWriter(self.run_dir / "metrics.jsonl", resumed_from=start) if main else None
        tracking = RunTracking(cfg.logging, self.run_dir, start, to_dict(cfg)) if main else None
        view = ProgressView(main, cfg.train.steps, start)
        if main:
            save_config(cfg, self.run_dir)
            resumed = f", resumed from step {start}" if start else ""
            view.message(f"lsys: {count_parameters(self.model):,} parameters, {self.session.world_size} ranks "
                         f"(dp={self.mesh.dp_size}, cp={self.mesh.cp_size}, tp={self.mesh.tp_size}), "
                         f"{self.device.type}{resumed}")
        losses, evals, started = [], [], time.perf_counter()
        guard = NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_max_skips)
        peaks = PeakMemory(self.device)  # a logged step's figure is its own, not the run's so far (on CUDA)
        stopped = None
        try:
            for step in range(start, end):
                self._maybe_fail(step)
                peaks.start_step()
                record = self.train_step(step)
                losses.append(record["loss"])
                done = step + 1
                stopped = guard.check(done, record)
                logged = None
                skipped = not record.pop("finite")
                if skipped:  # always logged; JSON has no NaN or infinity, so those values are null
                    record.update({k: None for k in ("loss", "grad_norm") if not math.isfinite(record[k])},
                                  skipped=True)
                if skipped or done % cfg.train.log_every == 0 or done == end:
                    record["peak_memory_bytes"] = self._peak_memory_per_rank(peaks.in_step())
                    logged = {"step": done, **record, "skipped_steps": guard.skipped}
                    if writer:
                        writer.write(logged)
                        tracking.step(logged)
                view.step(done, logged)
                if stopped:
                    view.message(stopped)
                    break
                if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps:
                    result = {"step": done, "split": "valid", **self.evaluate()}
                    evals.append(result)
                    if writer:
                        writer.write(result)
                        tracking.evaluation(result)
                    view.message(f"eval @ {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                                if isinstance(v, float)))
                if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == end:
                    if not self._weights_finite():  # never write a checkpoint that would poison a resume
                        stopped = guard.weights_not_finite(done)
                        view.message(stopped)
                        break
                    self._save(done)
        finally:
            view.close()
            if writer:
                writer.close()
                tracking.close()
        wall = time.perf_counter() - started
        held = {**state_bytes(self.model, self.optimizer), "resident": resident_bytes()}
        state_per_rank = [None] * self.session.world_size
        dist.all_gather_object(state_per_rank, held)
        summary = {"start_step": start, "end_step": start + len(losses), "losses": losses, "evals": evals,
                   "wall_time_s": wall, "peak_memory_bytes": self._peak_memory_per_rank(peaks.over_run()),
                   "state_bytes_per_rank": state_per_rank, "run_dir": str(self.run_dir),
                   "skipped_steps": guard.skipped, "stopped": stopped}
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def train(cfg: LsysConfig, optimizer_store: OptimizerStore | None = None) -> dict[str, Any]:
    """Train on this rank (joining or creating the process group); returns the run summary. `optimizer_store`
    holds this rank's optimizer state when optim.offload=cpu (the launcher places it)."""
    with distributed_session(cfg.train.device, cfg.train.collective_timeout_s) as session:
        validate_for_world(cfg, session.world_size)
        return Trainer(cfg, session, optimizer_store).run()


def evaluate(cfg: LsysConfig) -> dict[str, Any]:
    """Evaluate on this rank without training (`lsys eval`): the run directory's newest usable checkpoint when
    checkpoint.resume finds one, else the initial weights (model.pretrained's); returns {"step", "split", loss,
    the task's metric}. Writes nothing."""
    with distributed_session(cfg.train.device, cfg.train.collective_timeout_s) as session:
        trainer, step = evaluating_trainer(cfg, session)
        return {"step": step, "split": "valid", "seq_len": cfg.data.seq_len, **trainer.evaluate()}


def evaluating_trainer(cfg: LsysConfig, session: Session) -> tuple[Trainer, int]:
    """The trainer `evaluate` builds (the same model building, layouts and checkpoint choice as training),
    loaded with what it evaluates; -> (trainer, the checkpoint's step or 0)."""
    validate_for_world(cfg, session.world_size)
    trainer = Trainer(cfg, session)
    return trainer, trainer._resume("evaluating")


def train_from_dict(values: dict[str, Any]) -> dict[str, Any]:
    """Entry point for spawned ranks: configs travel as plain dicts."""
    from lsys.config import config_from_dict

    return train(config_from_dict(values))


def evaluate_from_dict(values: dict[str, Any]) -> dict[str, Any]:
    from lsys.config import config_from_dict

    return evaluate(config_from_dict(values))
