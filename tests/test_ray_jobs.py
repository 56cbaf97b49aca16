"""`lsys submit` on Ray, end to end on this machine (loopback only): bad configs fail before anything starts, and
an injected worker death is survived by a restart that trains exactly what an uninterrupted run trains."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from launch.ray_cluster import ray_tmpdir, running_cluster
from lsys.metrics import read_metrics
from tests.commands import TINY, lsys

pytestmark = pytest.mark.slow

# fp64: the Ray workers and `lsys train` ranks may use different thread counts; only rounding would differ.
RUN = [*TINY, "parallel.dp=1", "parallel.cp_ring=2", "cluster.num_workers=2", "train.steps=6", "train.log_every=1",
       "train.param_dtype=float64", "train.compute_dtype=float64"]


def test_bad_configs_fail_before_any_cluster_starts(tmp_path):
    home = tmp_path / "home"
    started = time.monotonic()
    mismatch = lsys("submit", "configs/demo.yaml", "cluster.num_workers=3", home=home)
    assert mismatch.returncode == 2
    assert "= 4 ranks, but the world size is 3; set parallel.dp=-1" in mismatch.stderr
    gpu_on_cpu = lsys("submit", "configs/demo.yaml", "cluster.num_workers=4", "train.device=cpu",
                      "cluster.gpus_per_worker=1", home=home)
    assert gpu_on_cpu.returncode == 2 and "cluster.gpus_per_worker=1.0: train.device=cpu" in gpu_on_cpu.stderr
    too_big = lsys("submit", "configs/demo.yaml", "cluster.cpus_per_worker=64", home=home)
    assert too_big.returncode == 2 and "cluster.cpus_per_worker=64: 4 workers need 256 CPUs" in too_big.stderr
    remote = lsys("submit", "configs/demo.yaml", "cluster.num_workers=4", "--address", "http://127.0.0.1:9",
                  "train.run_dir=runs/relative", home=home)
    assert remote.returncode == 2 and "needs an absolute path on storage its nodes share" in remote.stderr
    assert time.monotonic() - started < 40  # four CLI starts; no cluster, no worker
    assert not home.exists()


def _step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r}


def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(tmp_path):
    home, faulted, reference = tmp_path / "home", tmp_path / "faulted", tmp_path / "reference"
    result = lsys("submit", "configs/demo.yaml", *RUN, "cluster.max_failures=1", "train.fail_at_step=4",
                  f"train.run_dir={faulted}", "--follow", home=home, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    job_id = result.stdout.splitlines()[0]
    assert "SUCCEEDED" in result.stderr
    # Rank 1 died before step 4; the restarted group resumed from the checkpoint of step 2.
    assert (faulted / "injected_failure_step4_rank1").exists()
    assert "resumed from step 2" in result.stdout
    # Each group met in a fresh FileStore under run_dir/rendezvous; the dead group's file went with it, then the rest.
    assert not (faulted / "rendezvous").exists()
    # The embedded cluster this submit started is gone, its job archived and still listed.
    assert running_cluster(home) is None
    listed = lsys("jobs", "list", "--json", home=home)
    assert [(j["submission_id"], j["status"]) for j in json.loads(listed.stdout)] == [(job_id, "SUCCEEDED")]
    assert "resumed from step 2" in lsys("jobs", "logs", job_id, home=home).stdout

    local = lsys("train", "configs/demo.yaml", "--nproc", "2", *RUN, f"train.run_dir={reference}")
    assert local.returncode == 0, local.stderr
    expected, got = _step_losses(reference), _step_losses(faulted)
    assert sorted(got) == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)], dtype=torch.float64),
                               torch.tensor([expected[s] for s in sorted(got)], dtype=torch.float64))


def test_cluster_stops_itself_once_idle_and_keeps_its_jobs_readable(tmp_path, monkeypatch):
    home = tmp_path / "home"
    # Ray's default temp dir (RAY_TMPDIR/ray, else /tmp/ray) as another Ray cluster on this machine left it: the
    # embedded cluster keeps its state elsewhere, and neither writes nor, when it stops, deletes this address file.
    other_ray = tmp_path / "other" / "ray"
    other_ray.mkdir(parents=True)
    (other_ray / "ray_current_cluster").write_bytes(b"10.1.2.3:6379")
    monkeypatch.setenv("RAY_TMPDIR", str(other_ray.parent))
    # Long enough for the submit below to reach the cluster on a slow machine, short enough to wait for.
    started = lsys("cluster", "start", "--stop-when-idle", "15", home=home, timeout=180)
    assert started.returncode == 0, started.stderr
    # pytest's LSYS_HOME is too deep for Ray's Unix socket paths: Ray's state goes to a short directory instead.
    ray_dir = Path(json.loads(lsys("cluster", "status", home=home).stdout)["ray_temp_dir"])
    assert ray_dir.parent == ray_tmpdir(home) and ray_dir.parent.parent == Path("/tmp")
    submitted = lsys("submit", "configs/demo.yaml", *RUN, f"train.run_dir={tmp_path / 'run'}", home=home)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    deadline = time.monotonic() + 240
    while running_cluster(home) is not None:
        assert time.monotonic() < deadline, "the idle cluster did not stop"
        time.sleep(1)
    assert [p.name for p in other_ray.iterdir()] == ["ray_current_cluster"]
    assert (other_ray / "ray_current_cluster").read_bytes() == b"10.1.2.3:6379"
    assert "SUCCEEDED" in lsys("jobs", "status", job_id, home=home).stdout
    assert "step      6" in lsys("jobs", "logs", job_id, home=home).stdout
    stop = lsys("jobs", "stop", job_id, home=home)
    assert stop.returncode == 2 and "only jobs on a running cluster can be stopped" in stop.stderr


def test_job_paths_are_made_absolute_or_refused_for_a_remote_cluster(tmp_path, monkeypatch):
    from launch.ray_cli import _absolute_paths

    monkeypatch.chdir(tmp_path)
    values = {"train": {"run_dir": "runs/x"}, "data": {"text": {"path": "", "cache_dir": ""}},
              "model": {"pretrained": "models/llama"}}
    _absolute_paths(values, remote=False)
    assert values["model"]["pretrained"] == str(tmp_path / "models/llama")
    assert values["train"]["run_dir"] == str(tmp_path / "runs/x")
    with pytest.raises(ValueError, match="model.pretrained='models/llama': a job on a remote cluster"):
        _absolute_paths({**values, "train": {"run_dir": "/abs"}, "model": {"pretrained": "models/llama"}}, remote=True)
