"""The optimizer: torch AdamW on the rank, or AdamW whose fp32 state lives in an optimizer store elsewhere.

With `optim.offload=cpu` a rank keeps only its parameters and gradients (16- or 32-bit, the local shards when
FSDP2 or tensor parallelism shard them). An `OptimizerStore` (a Ray actor, launch/ray_offload.py, on any node)
holds the fp32 master copy of those shards and both Adam moments: 12 bytes per parameter that leave the rank. A
step sends the gradients, already clipped by the global norm, with each group's learning rate, and copies the
updated parameters back. The update is AdamW's, so clipping and the schedule behave exactly as without offload.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lsys.config import LsysConfig


class OptimizerStore(Protocol):
    """Holds fp32 master weights and Adam moments for flat parameter groups, and steps them."""

    def init(self, masters: list[Tensor], weight_decays: list[float], betas: tuple[float, float], eps: float,
             wire_dtype: torch.dtype) -> None: ...

    # grads: one flat tensor per group in wire_dtype -> updated parameters, the same shapes and dtype
    def step(self, grads: list[Tensor], lrs: list[float]) -> list[Tensor]: ...

    def state(self) -> dict[str, Tensor]: ...

    def load(self, state: dict[str, Tensor]) -> None: ...


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a (possibly distributed) tensor, as a plain tensor sharing its storage."""
    return t._local_tensor if isinstance(t, DTensor) else t


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norms and other vectors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW over `params`, the first `fraction` of each group's elements stepped by `store`, the rest locally."""

    def __init__(self, groups: list[dict[str, Any]], store: OptimizerStore, *, lr: float, betas: tuple[float, float],
                 eps: float, fraction: float):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.store = store
        params = [p for g in self.param_groups for p in g["params"]]
        budget = fraction * sum(local_shard(p).numel() for p in params)
        offloaded: set[int] = set()
        taken = 0
        for p in params:  # model order: embeddings and the first blocks first
            if taken + local_shard(p).numel() > budget + 0.5:
                break
            offloaded.add(id(p))
            taken += local_shard(p).numel()
        self.offloaded = [[p for p in g["params"] if id(p) in offloaded] for g in self.param_groups]
        kept = [(i, [p for p in g["params"] if id(p) not in offloaded]) for i, g in enumerate(self.param_groups)]
        kept = [(i, ps) for i, ps in kept if ps]
        self._kept_groups = [i for i, _ in kept]
        self.kept = torch.optim.AdamW(
            [{"params": ps, "weight_decay": self.param_groups[i]["weight_decay"]} for i, ps in kept],
            lr=lr, betas=betas, eps=eps) if kept else None
        self.wire_dtype = params[0].dtype
        masters = [self._flat([local_shard(p).detach() for p in group], torch.float32) for group in self.offloaded]
        store.init(masters, [g["weight_decay"] for g in self.param_groups], betas, eps, self.wire_dtype)

    @staticmethod
    def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        if not tensors:
            return torch.zeros(0, dtype=dtype)
        return torch.cat([t.reshape(-1).to("cpu", dtype) for t in tensors])

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the torch.optim signature
        grads = []
        for group in self.offloaded:
            missing = [p for p in group if p.grad is None]
            if missing:
                raise RuntimeError(f"{len(missing)} offloaded parameters have no gradient; every parameter must "
                                   "take part in the loss")
            grads.append(self._flat([local_shard(p.grad) for p in group], self.wire_dtype))
        updated = self.store.step(grads, [g["lr"] for g in self.param_groups])
        for group, flat in zip(self.offloaded, updated, strict=True):
            offset = 0
            for p in group:
                target = local_shard(p)
                target.copy_(flat[offset:offset + target.numel()].view_as(target))
                offset += target.numel()
        if self.kept is not None:
            for inner, outer in zip(self.kept.param_groups, self._kept_groups, strict=True):
                inner["lr"] = self.param_groups[outer]["lr"]
            self.kept.step()

    def rank_state(self) -> dict[str, Any]:
        """This rank's whole optimizer state (offloaded and local), for a per-rank checkpoint file."""
        return {"offloaded": self.store.state(), "kept": self.kept.state_dict() if self.kept is not None else None,
                "sizes": [sum(local_shard(p).numel() for p in group) for group in self.offloaded]}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        sizes = [sum(local_shard(p).numel() for p in group) for group in self.offloaded]
        if state["sizes"] != sizes:
            raise ValueError(f"offloaded optimizer state was saved for parameter shards of {state['sizes']} elements, "
                             f"this rank holds {sizes}: resume with the parallel layout and optim.fraction it was "
                             "saved with")
        self.store.load(state["offloaded"])
        if self.kept is not None:
            self.kept.load_state_dict(state["kept"])


def build_optimizer(cfg: LsysConfig, model: nn.Module, store: OptimizerStore | None) -> torch.optim.Optimizer:
    t = cfg.train
    groups = parameter_groups(model, t.weight_decay)
    if cfg.optim.offload == "none":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    if store is None:
        raise ValueError("optim.offload=cpu keeps the optimizer state in Ray actors: run it with `lsys submit`")
    return OffloadedAdamW(groups, store, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fraction=cfg.optim.fraction)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for training state: its parameter shards, as many for their gradients (same shapes
    and dtype), and the optimizer state it keeps itself (none of what an optimizer store holds)."""
    parameters = sum(local_shard(p).nbytes for p in model.parameters())
    inner = optimizer.kept if isinstance(optimizer, OffloadedAdamW) else optimizer
    kept = 0
    if inner is not None:
        kept = sum(local_shard(v).nbytes for state in inner.state.values() for v in state.values()
                   if isinstance(v, Tensor))
    return {"parameters": parameters, "gradients": parameters, "optimizer": kept}

