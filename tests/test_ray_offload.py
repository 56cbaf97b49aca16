"""Optimizer state offloaded to Ray actors on another node of a two-node cluster on this machine: the training
equals local AdamW, the actors live where optim.placement says, and a run that loses a worker or an actor
resumes the offloaded state from its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lsys.metrics import read_metrics
from tests.commands import TINY, lsys, two_node_cluster

pytestmark = pytest.mark.slow

# dp=2: FSDP2 shards every parameter, so each actor holds one rank's shards. Workers run on node 0 (the head);
# part of the state (optim.fraction) stays on the rank, so both halves of the optimizer are exercised.
RUN = [*TINY, "parallel.dp=2", "parallel.cp_ring=1", "cluster.num_workers=2", "train.steps=6", "train.log_every=1",
       "cluster.resources_per_worker.lsys_node_0=0.01"]
OFFLOAD = ["optim.offload=cpu", "optim.fraction=0.6"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("lsys-home")) as home:
        yield home


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The same training with torch AdamW on the ranks (`lsys train`, no Ray)."""
    run_dir = tmp_path_factory.mktemp("local")
    result = lsys("train", "configs/demo.yaml", "--nproc", "2", *RUN, f"train.run_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def _submit(home, run_dir, *extra: str) -> str:
    result = lsys("submit", "configs/demo.yaml", *RUN, *OFFLOAD, *extra, f"train.run_dir={run_dir}", "--follow",
                  home=home, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    return result.stdout


def _losses(run_dir) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r],
                        dtype=torch.float64)


def _final_parameters(run_dir, tmp_path) -> dict[str, torch.Tensor]:
    target = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / "step_00000006", target)
    return torch.load(target, weights_only=True)["model"]


def _placements(run_dir) -> list[dict]:
    return [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in range(2)]


def test_offloaded_adam_on_another_node_trains_like_local_adamw(home, local_run, tmp_path):
    run_dir = tmp_path / "offload"
    log = _submit(home, run_dir, "optim.placement=resource", "optim.resource=lsys_node_1")
    assert "DeepSpeed CPU Adam ready" in log
    workers = _placements(run_dir)
    assert workers[0]["node_id"] == workers[1]["node_id"]
    assert all(w["optimizer_node_id"] not in (None, w["node_id"]) for w in workers), workers
    torch.testing.assert_close(_losses(run_dir), _losses(local_run), rtol=1e-5, atol=1e-6)
    offloaded, local = _final_parameters(run_dir, tmp_path), _final_parameters(local_run, tmp_path)
    assert offloaded.keys() == local.keys()
    for name in local:
        torch.testing.assert_close(offloaded[name], local[name], msg=lambda m, n=name: f"{n}: {m}")


# Rank 1's process dies, or only the actor holding its state. A dying rank is what tests/test_ray_jobs.py's
# restart test does without offload: that variant is exhaustive.
@pytest.mark.parametrize("target", [pytest.param("rank", marks=pytest.mark.exhaustive), "optimizer"])
def test_lost_worker_or_actor_resumes_offloaded_state_from_checkpoint(home, tmp_path, target):
    uninterrupted = tmp_path / "uninterrupted"
    by_label = ["optim.placement=label", "optim.label=lsys-node=1"]
    _submit(home, uninterrupted, *by_label)
    faulted = tmp_path / f"faulted-{target}"
    log = _submit(home, faulted, *by_label, "cluster.max_failures=1", "train.fail_at_step=4",
                  f"train.fail_target={target}")
    assert "resumed from step 2" in log, target
    assert all(w["optimizer_node_id"] != w["node_id"] for w in _placements(faulted))
    # The restarted ranks made new actors and loaded the state saved at step 2: the same steps, bit for bit.
    torch.testing.assert_close(_losses(faulted), _losses(uninterrupted), rtol=0, atol=0, msg=target)
