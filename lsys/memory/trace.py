"""Predict one rank's memory for a cluster this machine does not have: trace a training step with fake tensors.

Rank 0 of `world_size` ranks joins a fake process group (collectives return at once, nothing is sent) and builds
the model under `FakeTensorMode` (tensors have shapes, dtypes and storages of the right size, but own no memory).
The real `parallelize()` and optimizer, and the trainer's own step code (`lsys.step.StepWork`), then run
one steady step while `MemoryTracker` records every storage, exactly as the profiler does on real tensors.
Ranks are symmetric (every degree splits the work evenly), so rank 0 stands for all of them; FSDP2's uneven last
shard makes rank 0 the largest if anything.

The planned device is the one of these kernels' CPU path: its flash attention keeps the same tensors (out and
log-sum-exp) as the Triton kernels on GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from lsys.config import LsysConfig
from lsys.data import Batch, task_type, task_vocabulary
from lsys.memory.profile import full_length
from lsys.memory.tracker import MemoryTracker, MemoryUsage
from lsys.model import Transformer
from lsys.optim import build_optimizer
from lsys.sharding import shard_batch
from lsys.step import StepWork, torch_dtype
from lsys.validation import validate
from parallel._compat import FakeTensorMode
from parallel.mesh import MeshInfo, build_mesh
from parallel.parallelize import parallelize

CPU = torch.device("cpu")


class PlannedStore:
    """The rank's side of an optimizer store: the state lives elsewhere, so it keeps nothing; each bucket's
    updated parameters come back as a fresh tensor, as a real store's transfer makes them."""

    def init(self, masters: list[Tensor], weight_decays: list[float], betas: tuple[float, float], eps: float,
             wire_dtype: torch.dtype) -> None:
        self.sizes, self.wire_dtype = [m.numel() for m in masters], wire_dtype

    def host_bytes(self) -> int:
        """What the real store holds for this rank in host memory on its node: fp32 master weights and two
        fp32 moments per element (DeepSpeed's CPU Adam)."""
        return 12 * sum(self.sizes)

    def put_grad(self, bucket: int, grad: Tensor) -> None:
        pass

    def drop_gradients(self) -> None:
        pass

    def step(self, grad_scale: Tensor | float, lrs: list[float], prescaled: frozenset[int] = frozenset()
             ) -> Iterator[Tensor]:
        for size in self.sizes:
            yield torch.empty(size, dtype=self.wire_dtype)

    def state(self) -> dict[str, Tensor]:
        return {}

    def load(self, state: dict[str, Tensor]) -> None:
        pass

    def fail(self) -> None:
        raise RuntimeError("a planned optimizer store cannot fail")


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """This process as rank 0 of `world_size` ranks in a fake process group, for as long as the context lasts."""
    if dist.is_initialized():
        raise RuntimeError("planning needs a process without a process group (it joins a fake one)")
    dist.init_process_group("fake", rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def vocabulary_size(cfg: LsysConfig) -> int:
    """model.vocab_size, or the synthetic task's vocabulary; a text dataset is not opened to plan."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if task_type(cfg.data.task).reads_dataset:
        raise ValueError(f"model.vocab_size=0 with data.task={cfg.data.task}: planning does not read the dataset; "
                         "set model.vocab_size to the tokenizer's vocabulary (e.g. model.vocab_size=128256)")
    return task_vocabulary(cfg)


def _batches(cfg: LsysConfig, dp: int) -> list[Batch]:
    """This rank's micro-batches at full length: their shapes and dtypes are all that matter."""
    local = cfg.train.global_batch_size // dp
    micro = cfg.train.micro_batch_size or local
    s = cfg.data.seq_len
    tokens = torch.zeros(micro, s, dtype=torch.int64)
    positions = torch.arange(s, dtype=torch.int64).expand(micro, s).contiguous()
    return [Batch(tokens, tokens.clone(), torch.ones(micro, s, dtype=torch.bool), positions.clone(), tokens.clone())
            for _ in range(local // micro)]


def _step(work: StepWork, cfg: LsysConfig, mesh: MeshInfo) -> None:
    batches = [shard_batch(b, mesh, cfg.parallel.cp_layout) for b in _batches(cfg, mesh.dp_size)]
    work.accumulate_gradients(batches, float(cfg.train.global_batch_size * cfg.data.seq_len))
    work.update()


def _initialise_optimizer(work: StepWork) -> None:
    """Create the optimizer's state (Adam allocates it at its first step) so the traced step is a steady one."""
    for param in work.model.parameters():
        param.grad = torch.zeros_like(param)
    work.optimizer.step()
    work.optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def trace_rank(cfg: LsysConfig, world_size: int) -> MemoryUsage:
    """Rank 0's memory over one steady training step of `cfg` on `world_size` ranks, from a fake trace.
    Raises ValueError when the config does not fit the world size (the same checks as a real run)."""
    validate(cfg, world_size)
    cfg = full_length(cfg)
    model_cfg = replace(cfg.model, vocab_size=vocabulary_size(cfg))
    with fake_world(world_size):
        mesh = build_mesh(cfg.parallel, CPU.type)
        fake = FakeTensorMode(allow_non_fake_inputs=True)  # the mesh's rank tables stay real
        with fake, _default_dtype(torch_dtype(cfg.train.param_dtype)):  # a fake model cannot be converted afterwards
            model = Transformer(model_cfg)
        parallelize(model, cfg.parallel, mesh, cfg.recompute, cfg.quant,  # builds sub-meshes: outside fake mode
                    compute_dtype=torch_dtype(cfg.train.compute_dtype))
        with fake:
            store = PlannedStore() if cfg.optim.offload != "none" else None
            work = StepWork(cfg, model, build_optimizer(cfg, model, store), CPU)
            _initialise_optimizer(work)
            tracker = MemoryTracker(model, work.optimizer, fake_mode=fake,
                                    host_state=cfg.parallel.fsdp_offload != "none")
            work.probe = tracker
            with tracker:
                _step(work, cfg, mesh)
    usage = tracker.usage()
    if store is not None:  # the optimizer actors beside this rank hold its offloaded state in host memory
        usage = replace(usage, host_peak_bytes=usage.host_peak_bytes + store.host_bytes())
    return usage

