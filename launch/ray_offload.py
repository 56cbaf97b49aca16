"""Offloaded optimizer state in Ray actors: one actor per rank holds the fp32 master weights and Adam moments of
the rank's parameter shards and steps them with DeepSpeed's CPU Adam (vectorised C++).

The actor is placed by optim.placement: on the rank's own node (ZeRO-Offload's choice), or on any node that
has a custom resource or a node label, e.g. a node with host memory to spare. The rank owns its actor, so the
actor dies with the rank; a dead actor fails the rank's next step, and the worker group restarts from the last
checkpoint, which holds the state (lsys.checkpoint). Tensors travel as numpy arrays through Ray's object store,
in the rank's parameter dtype (bf16 as its 16-bit pattern): 2 bytes per parameter each way for bf16 models.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from launch.cpu_adam_build import ensure_cpu_adam
from lsys.config import OptimConfig


def to_wire(t: Tensor) -> np.ndarray:
    """A contiguous CPU tensor as a numpy array of the same bytes (numpy has no bfloat16: its bits as int16)."""
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """The tensor over `a`'s bytes, without a copy. Arrays from Ray's object store are read-only; every caller
    only reads the result (copies it into parameters or casts it), so torch's warning about that is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a)
    return t.view(dtype) if dtype == torch.bfloat16 else t


class AdamShard:
    """The actor: one flat fp32 master per bucket, each stepped by its own DeepSpeedCPUAdam in AdamW mode (so a
    bucket's update can go back while the next one is computed)."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def init(self, masters: list[np.ndarray], weight_decays: list[float], betas: tuple[float, float], eps: float,
             wire_dtype: str) -> dict[str, Any]:
        started = time.perf_counter()
        # The C++ op is compiled on its first use in this Python environment (about a minute), loaded after.
        ensure_cpu_adam()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        self.wire_dtype = getattr(torch, wire_dtype)
        self.params = [torch.nn.Parameter(torch.from_numpy(m.copy())) for m in masters]
        self.adams = [DeepSpeedCPUAdam([p], lr=0.0, betas=betas, eps=eps, weight_decay=wd, adamw_mode=True)
                      for p, wd in zip(self.params, weight_decays, strict=True)]
        return {"ready_s": time.perf_counter() - started, "pid": os.getpid()}

    def fail(self) -> None:
        """Die without cleanup, as on a lost node: the owner's next call raises (fault injection)."""
        os._exit(17)

    def put_grad(self, bucket: int, grad: np.ndarray) -> None:
        # A copy: the array lives in Ray's read-only object store and the step scales the gradient in place.
        self.params[bucket].grad = from_wire(grad, self.wire_dtype).to(torch.float32, copy=True)

    def step_bucket(self, bucket: int, grad_scale: float, lr: float) -> np.ndarray:
        p, adam = self.params[bucket], self.adams[bucket]
        if grad_scale != 1.0:
            p.grad.mul_(grad_scale)
        adam.param_groups[0]["lr"] = lr
        adam.step()
        p.grad = None
        return to_wire(p.detach().to(self.wire_dtype))

    def drop_gradients(self) -> None:
        for p in self.params:
            p.grad = None

    def state(self) -> dict[str, Tensor]:
        out = {}
        for i, (p, adam) in enumerate(zip(self.params, self.adams, strict=True)):
            out[f"master.{i}"] = p.detach().clone()
            moments = adam.state.get(p)
            if moments:  # none before the first step
                out[f"step.{i}"] = torch.tensor(moments["step"])  # DeepSpeed counts steps in a Python int
                out[f"exp_avg.{i}"] = moments["exp_avg"].clone()
                out[f"exp_avg_sq.{i}"] = moments["exp_avg_sq"].clone()
        return out

    def load(self, state: dict[str, Tensor]) -> None:
        for i, (p, adam) in enumerate(zip(self.params, self.adams, strict=True)):
            with torch.no_grad():
                p.copy_(state[f"master.{i}"])
            if f"step.{i}" in state:
                adam.state[p] = {"step": int(state[f"step.{i}"]), "exp_avg": state[f"exp_avg.{i}"].clone(),
                                 "exp_avg_sq": state[f"exp_avg_sq.{i}"].clone()}


def placement_options(cfg: OptimConfig) -> dict[str, Any]:
    """Ray options that put an actor where optim.placement says (the caller runs inside a Ray worker)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if cfg.placement == "resource":
        return {"resources": {cfg.resource: 0.001}}  # a sliver: many ranks' actors share a node's one unit
    if cfg.placement == "label":
        key, value = cfg.label.split("=")
        return {"label_selector": {key: value}}
    here = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=here, soft=False)}


class ShardStore:
    """lsys.optim.OptimizerStore over an AdamShard reached through `submit(method_name, *args)`, which returns a
    handle that `result(handle)` waits for: in this process (tests) or in a Ray actor (RayOptimizerStore)."""

    def __init__(self, submit: Callable[..., Any], result: Callable[[Any], Any], rank: int = 0):
        self.submit = submit
        self.result = result
        self.rank = rank
        self._in_flight: list[Any] = []

    def call(self, method: str, *args: Any) -> Any:
        return self.result(self.submit(method, *args))

    def init(self, masters: list[Tensor], weight_decays: list[float], betas: tuple[float, float], eps: float,
             wire_dtype: torch.dtype) -> None:
        self.wire_dtype = wire_dtype
        info = self.call("init", [to_wire(m) for m in masters], weight_decays, betas, eps,
                         str(wire_dtype).removeprefix("torch."))
        if self.rank == 0:
            print(f"lsys: optimizer state offloaded ({sum(m.numel() for m in masters):,} parameters on rank 0, "
                  f"{len(masters)} buckets); DeepSpeed CPU Adam ready in {info['ready_s']:.1f} s (its first use in a "
                  "Python environment compiles it, later ones load it)",
                  file=sys.stderr, flush=True)

    def put_grad(self, bucket: int, grad: Tensor) -> None:
        self._in_flight.append(self.submit("put_grad", bucket, to_wire(grad)))

    def step(self, grad_scale: Tensor | float, lrs: list[float], prescaled: frozenset[int] = frozenset()
             ) -> Iterator[Tensor]:
        grad_scale = float(grad_scale)
        for handle in self._in_flight:  # surfaces a failed transfer here, not silently
            self.result(handle)
        self._in_flight.clear()
        # Every bucket's step is queued at once: the actor computes bucket b+1 while b travels back.
        handles = [self.submit("step_bucket", b, 1.0 if b in prescaled else grad_scale, lr) for b, lr in enumerate(lrs)]
        for handle in handles:
            yield from_wire(self.result(handle), self.wire_dtype)

    def drop_gradients(self) -> None:
        for handle in self._in_flight:  # a failed transfer surfaces here too
            self.result(handle)
        self._in_flight.clear()
        self.call("drop_gradients")

    def state(self) -> dict[str, Tensor]:
        return self.call("state")

    def load(self, state: dict[str, Tensor]) -> None:
        self.call("load", state)

    def fail(self) -> None:
        self.submit("fail")  # not waited for: the shard dies, and the next step finds out


def local_store() -> ShardStore:
    """A store whose shard runs in this process, synchronously."""
    shard = AdamShard()
    return ShardStore(lambda method, *args: getattr(shard, method)(*args), lambda value: value)


class RayOptimizerStore(ShardStore):
    """A ShardStore whose AdamShard is a Ray actor placed by optim.placement, owned by (and dying with) this rank."""

    def __init__(self, cfg: OptimConfig, rank: int):
        import ray

        # num_cpus=0: the actor is busy only between a rank's backward and its next forward, when the rank waits.
        actor_class = ray.remote(num_cpus=0, max_restarts=0)(AdamShard)
        actor = actor_class.options(name=f"lsys-adam-rank{rank}", **placement_options(cfg)).remote()
        super().__init__(lambda method, *args: getattr(actor, method).remote(*args), ray.get, rank)
        self.node_id = self.call("node_id")
