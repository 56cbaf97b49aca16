"""The optimizer: torch AdamW on the rank, or AdamW whose fp32 state lives in an optimizer store elsewhere.

Both are a `TrainingOptimizer`, the one interface the step, checkpoints and the memory tools use, so none of them
asks which optimizer it has.

With `optim.offload=cpu` a rank keeps only its parameters and gradients (16- or 32-bit, the local shards when
FSDP2 or tensor parallelism shard them). An `OptimizerStore` (a Ray actor, launch/ray_offload.py, on any node)
holds the fp32 master copy of those shards and both Adam moments: 12 bytes per parameter that leave the rank.
Gradients travel while backward still runs, through a few reused host buffers (pinned, and copied on a side
stream, when they are on CUDA, so backward does not wait for the copies); the step then sends the clipping
factor and each group's learning rate, and copies the updated parameters back. The update is AdamW's, so
clipping and the schedule behave exactly as without offload.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from lsys.config import LsysConfig

# The elements an offloaded parameter bucket gathers (a parameter shard larger than this is a bucket of its own).
BUCKET_ELEMENTS = 2**22
# Host buffers the gradients leave a rank through, each the size of the largest bucket: while one is filled, the
# one before is on its way to the store; a third keeps backward from waiting on a copy still under way.
GRADIENT_BUFFERS = 3


class OptimizerStore(Protocol):
    """Holds fp32 master weights and Adam moments for flat parameter buckets, and steps them."""

    def init(self, masters: list[Tensor], weight_decays: list[float], betas: tuple[float, float], eps: float,
             wire_dtype: torch.dtype) -> None: ...

    def put_grad(self, bucket: int, grad: Tensor) -> None:
        """Start sending one bucket's gradient (flat, wire_dtype); returns at once. The store keeps nothing of
        `grad`'s memory after returning: the caller copies the next step's gradient into it."""

    def step(self, grad_scale: Tensor | float, lrs: list[float], prescaled: frozenset[int] = frozenset()
             ) -> Iterator[Tensor]:
        """Scale every bucket's gradient but the `prescaled` ones', take the AdamW step, and yield the updated
        parameters bucket by bucket. `grad_scale` may be a scalar tensor: the store reads it when it needs it."""

    def drop_gradients(self) -> None:
        """Forget the gradients sent since the last step (the step is skipped); waits for them to arrive first."""

    def state(self) -> dict[str, Tensor]: ...

    def load(self, state: dict[str, Tensor]) -> None: ...

    def fail(self) -> None:
        """End abruptly, as a lost node would (fault injection): every later call raises."""


class TrainingOptimizer(Protocol):
    """What the step (lsys.step), checkpoints (lsys.checkpoint) and the memory tools use of an optimizer."""

    param_groups: list[dict[str, Any]]
    # True: part of the state is tied to this rank's parameter shards and cannot be resharded by DCP: rank_state()
    # is saved in a file per rank and load_rank_state() restores it (only such optimizers have the two).
    per_rank_state: bool

    def stream_gradients(self) -> contextlib.AbstractContextManager:
        """Around the backward that makes the gradients final (the last micro-batch's)."""

    def step_clipped(self, grad_norm: Tensor, max_norm: float) -> None:
        """The update, once torch's clip_grad_norm_(max_norm) has clipped the local gradients and returned
        `grad_norm` (a scalar tensor; its value is not read here, the step runs on fake tensors too)."""

    def discard_gradients(self) -> None:
        """Skip this step: drop its gradients (those already sent elsewhere too); weights and state stay."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def held_state_tensors(self) -> list[Tensor]:
        """The state tensors this rank holds itself, as local shards (none of what an optimizer store keeps)."""

    def host_buffers(self) -> list[Tensor]:
        """Host memory this rank holds besides its state: the buffers gradients leave through for a store."""

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        """This optimizer's entries of the checkpoint's DCP state dict (resharded on load); may be empty."""

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore from the DCP state dict `checkpoint_state` was filled into and loaded."""


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a (possibly distributed) tensor, as a plain tensor sharing its storage. Read without
    grad: with it, `to_local()` would record an autograd node, and no caller differentiates through the shard
    (they count it, copy into it, or look at its storage)."""
    if not isinstance(t, DTensor):
        return t
    with torch.no_grad():
        return t.to_local()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norms and other vectors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LocalAdamW(torch.optim.AdamW):
    """torch's AdamW, all of its state on this rank: DCP saves it with the model and reshards it on load."""

    per_rank_state = False

    def stream_gradients(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the gradients stay here until the step

    def step_clipped(self, grad_norm: Tensor, max_norm: float) -> None:  # noqa: ARG002 - the protocol's
        self.step()  # torch's clip_grad_norm_ has already scaled the gradients it steps on

    def discard_gradients(self) -> None:
        self.zero_grad(set_to_none=True)

    def held_state_tensors(self) -> list[Tensor]:
        return [local_shard(v) for state in self.state.values() for v in state.values() if isinstance(v, Tensor)]

    def host_buffers(self) -> list[Tensor]:
        return []

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:
        return {"optimizer": get_optimizer_state_dict(model, self)}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(model, self, state["optimizer"])


@dataclass
class _Bucket:
    group: int
    params: list[nn.Parameter]  # in the order their gradients are expected: reversed model order
    waiting: int = 0  # gradients of this bucket not yet final in the current backward


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW over the parameter `groups`; the state of the first `fraction` of the elements lives in `store`.

    Offloaded parameters are cut into buckets of about `bucket_elements`. Inside `stream_gradients()` (the
    backward that makes gradients final) a bucket's gradients are copied into a free host buffer (one of
    GRADIENT_BUFFERS, each the size of the largest bucket) as soon as all of them are final, while backward goes
    on with earlier layers, and the buffer goes to the store once the copy has arrived (at once on CPU; on CUDA at
    a later hook, when a buffer is needed, or when the step needs it), which frees it. `step(grad_scale)` then sends
    the clipping factor and the learning rates, and copies each bucket's updated parameters in as they come back.
    The offloaded state is tied to this rank's shards, so checkpoints keep it per rank (rank_state), not in DCP.
    """

    per_rank_state = True

    def __init__(self, groups: list[dict[str, Any]], store: OptimizerStore, *, lr: float, betas: tuple[float, float],
                 eps: float, fraction: float, bucket_elements: int = BUCKET_ELEMENTS):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.store = store
        params = [p for g in self.param_groups for p in g["params"]]
        budget = fraction * sum(local_shard(p).numel() for p in params)
        offloaded: set[int] = set()
        taken = 0
        for p in params:  # group order: the matrices (most of the state) first
            if taken + local_shard(p).numel() > budget + 0.5:
                break
            offloaded.add(id(p))
            taken += local_shard(p).numel()
        self.buckets: list[_Bucket] = []
        for index, group in enumerate(self.param_groups):
            current = None
            for p in reversed([p for p in group["params"] if id(p) in offloaded]):
                if current is None or sum(local_shard(q).numel() for q in current.params) >= bucket_elements:
                    current = _Bucket(index, [])
                    self.buckets.append(current)
                current.params.append(p)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket.params}
        kept = [(i, [p for p in g["params"] if id(p) not in offloaded]) for i, g in enumerate(self.param_groups)]
        kept = [(i, ps) for i, ps in kept if ps]
        self._kept_groups = [i for i, _ in kept]
        self.kept = LocalAdamW(
            [{"params": ps, "weight_decay": self.param_groups[i]["weight_decay"]} for i, ps in kept],
            lr=lr, betas=betas, eps=eps) if kept else None
        self.wire_dtype = params[0].dtype
        self._streaming = False
        self._sent: set[int] = set()  # buckets whose copy to the host has started since the last step
        # Copies not yet given to the store, oldest first: (bucket, buffer, its filled part, the copy's event or
        # None once it has arrived).
        self._arriving: deque[tuple[int, Tensor, Tensor, torch.cuda.Event | None]] = deque()
        self._buffers: list[Tensor] = []  # the GRADIENT_BUFFERS host buffers
        self._free: list[Tensor] = []  # those not holding a bucket on its way to the store
        self._buffer_elements = max(self._sizes(), default=0)
        self._side: torch.cuda.Stream | None = None  # the copies' stream, when the gradients are on CUDA
        for p in params:
            if id(p) in offloaded:
                p.register_post_accumulate_grad_hook(self._gradient_final)
        masters = [self._flat([local_shard(p).detach() for p in b.params], torch.float32) for b in self.buckets]
        store.init(masters, [self.param_groups[b.group]["weight_decay"] for b in self.buckets], betas, eps,
                   self.wire_dtype)

    @staticmethod
    def _flat(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat([t.reshape(-1).to("cpu", dtype) for t in tensors])

    @contextlib.contextmanager
    def stream_gradients(self) -> Iterator[None]:
        """Around the backward that makes the gradients final (the last micro-batch's)."""
        self._streaming = True
        self._sent.clear()
        for bucket in self.buckets:
            bucket.waiting = len(bucket.params)
        try:
            yield
        finally:
            self._streaming = False
            if self._side is not None:  # clipping scales the gradients in place: after the copies have read them
                torch.cuda.current_stream(self._side.device).wait_stream(self._side)

    def _gradient_final(self, param: nn.Parameter) -> None:
        if not self._streaming:
            return
        index = self._bucket_of[id(param)]
        bucket = self.buckets[index]
        bucket.waiting -= 1
        if bucket.waiting < 0:  # its copy may be under way: the store would miss (or half-see) this change
            raise RuntimeError("an offloaded parameter's gradient changed after its bucket was sent: "
                               "stream_gradients() holds one backward, the last of the step")
        if bucket.waiting == 0:
            self._send(index)
        self._arrived(wait=False)

    def _send(self, index: int) -> None:
        """Start copying the bucket's gradients into a free host buffer; `_arrived` gives it to the store."""
        bucket = self.buckets[index]
        missing = [p for p in bucket.params if p.grad is None]
        if missing:
            raise RuntimeError(f"{len(missing)} offloaded parameters have no gradient; every parameter must take "
                               "part in the loss")
        grads = [local_shard(p.grad) for p in bucket.params]
        if not self._buffers:  # all at the first send (as a plan counts them), reused after
            self._buffers = [torch.empty(self._buffer_elements, dtype=self.wire_dtype, device="cpu",
                                         pin_memory=grads[0].is_cuda) for _ in range(GRADIENT_BUFFERS)]
            self._free = list(self._buffers)
        if not self._free:  # every buffer holds a copy under way: the oldest is needed first
            self._arrived(wait=True, until_free=True)
        buffer = self._free.pop()
        host = buffer[:sum(g.numel() for g in grads)]
        self._arriving.append((index, buffer, host, self._copy(grads, host)))
        self._sent.add(index)

    def _copy(self, grads: list[Tensor], host: Tensor) -> torch.cuda.Event | None:
        """host <- the gradients, flat. On CPU now (None); on CUDA queued on the side stream: the event marks
        when the copy has arrived, and backward goes on meanwhile."""
        if not grads[0].is_cuda:
            _copy_flat(host, grads, non_blocking=False)
            return None
        # -- CUDA --
        if self._side is None:
            self._side = torch.cuda.Stream(grads[0].device)
        self._side.wait_stream(torch.cuda.current_stream(grads[0].device))  # where the gradients were made
        with torch.cuda.stream(self._side):
            _copy_flat(host, grads, non_blocking=True)
        for g in grads:
            g.record_stream(self._side)  # their memory is not handed out again before the copy has read it
        return self._side.record_event()

    def _arrived(self, wait: bool, until_free: bool = False) -> None:
        """Give the store each bucket whose copy has arrived, in the order the copies started (so the same order
        on every run); with `wait`, every one (or, `until_free`, until a buffer is free), waiting for copies
        still under way.

        The buffer is free again once put_grad returns: the in-process store copies it (AdamShard.put_grad), and
        Ray serialises a task's arguments when the call is submitted, into its object store (over 100 KB) or into
        the task itself (checked with Ray 2.60: an array overwritten right after `.remote()` reaches the actor
        with its old values). The next step's copy into it starts after that."""
        while self._arriving and not (until_free and self._free):
            index, buffer, host, event = self._arriving[0]
            if event is not None:
                if not (wait or event.query()):
                    return
                event.synchronize()
            self._arriving.popleft()
            self.store.put_grad(index, host)
            self._free.append(buffer)

    @torch.no_grad()
    def step(self, closure=None, grad_scale: Tensor | float = 1.0):  # noqa: ARG002 - the torch.optim signature
        """`grad_scale`: the factor clipping applied to the local gradients, which the ones sent during backward
        have not seen (a float, or a scalar tensor the store reads)."""
        # Not streamed (no stream_gradients), or not made final by the last backward (a parameter only an earlier
        # micro-batch reached): sent now, after clipping has scaled them in place, so the store must not again.
        late = frozenset(index for index in range(len(self.buckets)) if index not in self._sent)
        for index in sorted(late):
            self._send(index)
        self._arrived(wait=True)
        self._sent.clear()
        lrs = [self.param_groups[b.group]["lr"] for b in self.buckets]
        for bucket, flat in zip(self.buckets, self.store.step(grad_scale, lrs, late), strict=True):
            offset = 0
            for p in bucket.params:
                target = local_shard(p)
                target.copy_(flat[offset:offset + target.numel()].view_as(target))
                offset += target.numel()
        if self.kept is not None:
            for inner, outer in zip(self.kept.param_groups, self._kept_groups, strict=True):
                inner["lr"] = self.param_groups[outer]["lr"]
            self.kept.step()

    def step_clipped(self, grad_norm: Tensor, max_norm: float) -> None:
        # Gradients sent during backward were not clipped yet: the same factor, as torch computes it.
        self.step(grad_scale=torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0))

    def discard_gradients(self) -> None:
        """Skip this step: the gradients already sent are dropped and neither masters nor moments change."""
        self._arrived(wait=True)  # so none arrives after the store has dropped the others
        self.store.drop_gradients()
        self._sent.clear()
        self.zero_grad(set_to_none=True)

    def held_state_tensors(self) -> list[Tensor]:
        return self.kept.held_state_tensors() if self.kept is not None else []

    def host_buffers(self) -> list[Tensor]:
        # GRADIENT_BUFFERS x the largest bucket, for the whole run (pinned on CUDA): the memory tools count them.
        return list(self._buffers)

    def checkpoint_state(self, model: nn.Module) -> dict[str, Any]:  # noqa: ARG002 - all of it is per rank
        return {}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, Any]) -> None:  # noqa: ARG002
        """Nothing: rank_state holds all of it."""

    def _sizes(self) -> list[int]:
        return [sum(local_shard(p).numel() for p in bucket.params) for bucket in self.buckets]

    def rank_state(self) -> dict[str, Any]:
        """This rank's whole optimizer state (offloaded and local), for a per-rank checkpoint file."""
        return {"offloaded": self.store.state(), "kept": self.kept.state_dict() if self.kept is not None else None,
                "sizes": self._sizes()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        if state["sizes"] != self._sizes():
            raise ValueError(f"offloaded optimizer state was saved for parameter shards of {state['sizes']} elements, "
                             f"this rank holds {self._sizes()}: resume with the parallel layout and optim.fraction it "
                             "was saved with")
        self.store.load(state["offloaded"])
        if self.kept is not None:
            self.kept.load_state_dict(state["kept"])


def _copy_flat(flat: Tensor, tensors: list[Tensor], non_blocking: bool) -> None:
    """flat [sum of numels] <- the tensors one after another, cast to flat's dtype."""
    offset = 0
    for t in tensors:
        flat[offset:offset + t.numel()].copy_(t.reshape(-1), non_blocking=non_blocking)
        offset += t.numel()


def build_optimizer(cfg: LsysConfig, model: nn.Module, store: OptimizerStore | None) -> TrainingOptimizer:
    t = cfg.train
    groups = parameter_groups(model, t.weight_decay)
    if cfg.optim.offload == "none":
        # foreach: for DTensor parameters (FSDP2, tensor parallelism) torch picks its per-parameter loop, one DTensor
        # dispatch per parameter per operation; the foreach path is one per operation (bench/demo_overhead.py: the
        # demo's optimizer step twice as cheap). The same update, bit for bit in float64.
        return LocalAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
    if store is None:
        raise ValueError("optim.offload=cpu keeps the optimizer state in Ray actors: run it with `lsys submit`")
    return OffloadedAdamW(groups, store, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fraction=cfg.optim.fraction)


def state_bytes(model: nn.Module, optimizer: TrainingOptimizer) -> dict[str, int]:
    """Bytes this rank holds for training state: its parameter shards, as many for their gradients (same shapes
    and dtype), and the optimizer state it keeps itself (none of what an optimizer store holds)."""
    parameters = sum(local_shard(p).nbytes for p in model.parameters())
    held = sum(t.nbytes for t in optimizer.held_state_tensors())
    return {"parameters": parameters, "gradients": parameters, "optimizer": held}

