"""Loading a HuggingFace checkpoint, and the random start, into a model built on the meta device and parallelized:
every layout ends with every parameter's full tensor equal to the file's (or to `build_model`'s), and a rank
never holds more than its shards plus one tensor in flight."""

from __future__ import annotations

import math
import weakref
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from lsys.hf import load_pretrained
from lsys.hf.config import model_config_from_hf
from lsys.hf.names import hf_name
from lsys.model import Transformer, build_model
from lsys.weights import materialize
from parallel._compat import TorchDispatchMode, is_traceable_wrapper_subclass, tree_leaves
from parallel.shards import local_tensor
from tests.distributed import run_ranks
from tests.hf.checkpoints import QWEN2, write_checkpoint


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages operators create while entered that are still alive, and their peak: what a
    loader allocates (the shards, and what it has in flight). Views and in-place writes create nothing."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # its local operators come back here
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not leaf.is_meta and not is_traceable_wrapper_subclass(leaf):
                storage = leaf.untyped_storage()
                if id(storage) not in self.live and storage.nbytes():
                    self.live[id(storage)] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, id(storage), None)
                    self.peak = max(self.peak, sum(self.live.values()))
        return out


def _shard_bytes(model: torch.nn.Module) -> int:
    storages = {id(s): s.nbytes() for p in model.parameters() for s in [local_tensor(p).untyped_storage()]}
    return sum(storages.values())


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def _load_on_ranks(directory: str, parallel: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """On each rank: build on meta, parallelize, materialize from the checkpoint and from a seed; what differs
    from the file and from `build_model`, the shard bytes and the loader's peak."""
    import torch.distributed as dist

    from parallel.config import ParallelConfig
    from parallel.mesh import build_mesh
    from parallel.parallelize import parallelize

    cfg = model_config_from_hf(config)
    mesh = build_mesh(ParallelConfig(**parallel), "cpu")
    from safetensors.torch import load_file

    from lsys.hf.checkpoint import safetensors_files

    in_file = {k: v for f in safetensors_files(directory) for k, v in load_file(str(f)).items()}
    reference = build_model(cfg, torch.device("cpu"), torch.float32, seed=5)
    result: dict[str, Any] = {"world": dist.get_world_size()}
    for source in ("pretrained", "random"):
        with torch.device("meta"):
            model = Transformer(cfg).to(torch.float32)
        parallelize(model, ParallelConfig(**parallel), mesh)
        probe = LiveBytes()
        with probe:
            materialize(model, torch.device("cpu"), seed=5, pretrained=directory if source == "pretrained" else "")
        result[f"{source}_peak"], result[f"{source}_held"] = probe.peak, sum(probe.live.values())
        result[f"{source}_shards"] = _shard_bytes(model)
        result[f"{source}_tied"] = model.lm_head.weight is model.embed.weight
        wrong = []
        for name, p in model.named_parameters():
            want = in_file[hf_name(name)].float() if source == "pretrained" else reference.get_parameter(name)
            if not torch.equal(_full(p), want):
                wrong.append(name)
        result[f"{source}_wrong"] = wrong
    result["largest"] = max(p.numel() * 4 for p in reference.parameters())
    result["whole"] = sum(p.numel() * 4 for p in reference.parameters())
    return result


# DTensor's offset arithmetic makes a few index tensors of its own while a tensor is in flight.
BOOKKEEPING = 1024

LAYOUTS = {
    "one-rank": {},
    "ring2": {"cp_ring": 2, "dp": 1},
    "tp2": {"tp": 2, "dp": 1},
    "dp2": {"dp": 2},
    "tp2xdp2": {"tp": 2, "dp": 2},
}


# Tied embeddings are refused with tensor parallelism.
CASES = [(layout, False) for layout in LAYOUTS] + [("one-rank", True), ("dp2", True)]


@pytest.mark.parametrize(("layout", "tied"), CASES, ids=[f"{lay}-{'tied' if t else 'untied'}" for lay, t in CASES])
def test_every_layout_loads_the_file_and_the_random_start_of_build_model(tmp_path, layout, tied):
    config = {**QWEN2, "tie_word_embeddings": tied}
    write_checkpoint(tmp_path / "ckpt", config, files=2)
    parallel = LAYOUTS[layout]
    world = math.prod(parallel.values())
    results = run_ranks(_load_on_ranks, world, str(tmp_path / "ckpt"), parallel, config, timeout_s=120)
    for rank, r in enumerate(results):
        for source in ("pretrained", "random"):
            assert r[f"{source}_wrong"] == [], (rank, source)
            assert r[f"{source}_tied"] is tied
            # What the loader leaves allocated is the shards; while loading, at most one full tensor more (the
            # random start draws one parameter at a time; a checkpoint's slices are views of the mapped file, so
            # the file's pages are not counted here: bench/load_pretrained.py measures the resident memory).
            assert r[f"{source}_held"] == r[f"{source}_shards"], (rank, source)
            assert r[f"{source}_peak"] <= r[f"{source}_shards"] + r["largest"] + BOOKKEEPING, (rank, source)
        # Every multi-rank layout here shards the parameters (FSDP2 over dp x cp, and tp).
        assert (r["pretrained_shards"] < r["whole"]) if world > 1 else (r["pretrained_shards"] == r["whole"])


def test_load_pretrained_is_one_process_model_with_the_files_values(tmp_path):
    tensors = write_checkpoint(tmp_path / "ckpt", files=3, index=False)
    model = load_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, tensors[hf_name(name)].double()), name
    logits = model(torch.randint(0, 64, (2, 5)), torch.arange(5).expand(2, 5))
    assert logits.shape == (2, 5, 64)
