"""One optimizer step's tensor work on one rank: forward and backward over the micro-batches, clipping, the update.

Nothing here reads a tensor's value (no `.item()`), so the same code runs on real tensors (the trainer, the memory
profiler) and on fake ones (the planner traces one rank of a cluster this machine does not have). A probe sees the
step's phases ("forward", "backward", "optimizer"): the memory tracker uses them to tell stored activations from
temporaries.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lsys.config import LsysConfig
from lsys.data import Batch
from lsys.model import logit_losses
from lsys.optim import TrainingOptimizer
from parallel.context import ShardedDocuments
from parallel.data_parallel import gradient_sync


def torch_dtype(name: str) -> torch.dtype:
    """A train.param_dtype or compute_dtype (one of lsys.config.DTYPES, each named as torch names it) -> the dtype."""
    return getattr(torch, name)


class StepProbe(Protocol):
    def phase(self, name: str) -> contextlib.AbstractContextManager: ...


class NoProbe:
    def phase(self, name: str) -> contextlib.AbstractContextManager:  # noqa: ARG002 - the probe protocol
        return contextlib.nullcontext()


class StepWork:
    def __init__(self, cfg: LsysConfig, model: nn.Module, optimizer: TrainingOptimizer, device: torch.device,
                 document_masks: bool = False):
        self.cfg = cfg
        self.document_masks = document_masks  # the task's (Task.document_masks): pass the batch's ids on
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.probe: StepProbe = NoProbe()

    def autocast(self) -> contextlib.AbstractContextManager:
        t = self.cfg.train
        if t.compute_dtype != t.param_dtype:
            # No cast cache: it would keep a low-precision copy of every layer's gathered weight until the forward
            # ends, whatever FSDP2 frees (16 GiB per rank for configs/gpu_8b_1m.yaml, found by `lsys plan`).
            return torch.autocast(self.device.type, dtype=torch_dtype(t.compute_dtype), cache_enabled=False)
        return contextlib.nullcontext()

    def token_losses(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """For evaluation, which needs the predictions too (no backward).
        batch: [B, S_local] -> per-token cross-entropy [B, S_local] (at least fp32), argmax predictions
        [B, S_local] int64. With train.loss_chunk_tokens the logits are made a chunk at a time as for training:
        no [B, S_local, V] tensor exists."""
        with self.autocast():
            return self.model(batch.tokens.to(self.device), batch.positions.to(self.device),
                              labels=batch.labels.to(self.device), loss_chunk_tokens=self.cfg.train.loss_chunk_tokens,
                              document_ids=self._document_ids(batch), predictions=True)

    def training_losses(self, batch: Batch) -> Tensor:
        """batch: [B, S_local] -> per-token cross-entropy [B, S_local]; no logits kept.

        With train.loss_chunk_tokens the model makes the logits a chunk at a time. Without, the whole loss is
        taken outside the model: FSDP2 then starts backward (and gathers the last block's parameters) only once
        the loss's own backward buffers are freed (0.8 GiB less at the peak of configs/gpu_8b_1m.yaml)."""
        labels = batch.labels.to(self.device)
        with self.autocast():
            if not self.cfg.train.loss_chunk_tokens:
                logits = self.model(batch.tokens.to(self.device), batch.positions.to(self.device),
                                    document_ids=self._document_ids(batch))
            else:
                return self.model(batch.tokens.to(self.device), batch.positions.to(self.device), labels=labels,
                                  loss_chunk_tokens=self.cfg.train.loss_chunk_tokens,
                                  document_ids=self._document_ids(batch))
        return logit_losses(logits, labels)

    def _document_ids(self, batch: Batch) -> Tensor | ShardedDocuments | None:
        # batch: [B, S_local] -> its document ids [B, S_local], or None: unmasked attention takes the plain path.
        # A batch sharded with a layout chosen for it carries that layout with its ids, which its attention
        # needs even unmasked (its ids are then all one document).
        ids = batch.document_ids
        return ids.to(self.device) if self.document_masks or isinstance(ids, ShardedDocuments) else None

    def accumulate_gradients(self, micro_batches: list[Batch], global_tokens: float) -> Tensor:
        """Forward and backward of every micro-batch (gradients synchronised on the last); returns the summed
        masked loss (fp64 scalar) of this rank. The loss is divided by the GLOBAL token count."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            streaming = self.optimizer.stream_gradients() if last else contextlib.nullcontext()
            with gradient_sync(self.model, enabled=last), streaming:
                with self.probe.phase("forward"):
                    losses = self.training_losses(batch)
                    masked = (losses * batch.loss_mask.to(self.device)).sum()
                    del losses
                with self.probe.phase("backward"):
                    (masked / global_tokens).backward()
            loss_sum += masked.detach().double()
        return loss_sum

    def clip_gradients(self) -> Tensor:
        """Clip the gradients to train.grad_clip; returns the global gradient norm (a scalar tensor, the same on
        every rank), which the caller checks before `apply_update`."""
        with self.probe.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._max_norm())
            if isinstance(grad_norm, DTensor):  # sharded parameters: the norm over every shard
                grad_norm = grad_norm.full_tensor()
        return grad_norm

    def apply_update(self, grad_norm: Tensor) -> None:
        """Step the optimizer on the clipped gradients, then drop them."""
        with self.probe.phase("optimizer"):
            self.optimizer.step_clipped(grad_norm, self._max_norm())
            self.optimizer.zero_grad(set_to_none=True)

    def discard_update(self) -> None:
        """Drop this step's gradients without touching the weights or the optimizer state (a non-finite step)."""
        self.optimizer.discard_gradients()

    def update(self) -> Tensor:
        """Clip, step, drop the gradients; returns the global gradient norm (a scalar tensor)."""
        grad_norm = self.clip_gradients()
        self.apply_update(grad_norm)
        return grad_norm

    def _max_norm(self) -> float:
        return self.cfg.train.grad_clip or float("inf")
