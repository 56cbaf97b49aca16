"""Jobs on an embedded two-node Ray cluster (a head plus a second node joined to it, both on 127.0.0.1): workers
span the nodes, metrics and checkpoints land in the run directory, nothing listens beyond loopback (neither the
cluster nor a job's workers), Ray's state stays in the cluster's own directory, and a running job can be stopped."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from launch.ray_cluster import _RAY_SOCKET_SUFFIX, _SOCKET_PATH_MAX, _private_directory, ray_tmpdir
from lsys.metrics import read_metrics
from tests.commands import TINY, lsys, two_node_cluster
from tests.sockets import exposed, listeners, process_tree

pytestmark = pytest.mark.slow

TWO_WORKERS = [*TINY, "parallel.dp=1", "parallel.cp_ring=2", "cluster.num_workers=2"]


# What another Ray on this machine keeps in its default temp dir, which the embedded cluster must not touch.
OTHER_CLUSTER = b"10.1.2.3:6379"


@pytest.fixture(scope="module")
def default_ray_tmpdir(tmp_path_factory):
    """RAY_TMPDIR for the `lsys` commands of this module, as if another Ray cluster used it (Ray's default temp dir
    is RAY_TMPDIR/ray, else /tmp/ray, which this test leaves alone)."""
    tmpdir = tmp_path_factory.mktemp("default-ray-tmpdir")
    (tmpdir / "ray").mkdir()
    (tmpdir / "ray" / "ray_current_cluster").write_bytes(OTHER_CLUSTER)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", str(tmpdir))
        yield tmpdir


@pytest.fixture(scope="module")
def home(default_ray_tmpdir):
    """LSYS_HOME of the module's cluster: short enough for Ray's state to live in it (pytest's paths are not)."""
    home = Path(tempfile.mkdtemp(prefix="lsys-t", dir="/tmp"))
    try:
        with two_node_cluster(home):
            yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _daemon_tree(home: Path) -> list[psutil.Process]:
    """The cluster's daemon and everything it started: raylets, GCS, dashboard, job drivers, Ray Train workers."""
    return process_tree(json.loads(lsys("cluster", "status", home=home).stdout)["pid"])


def _train_workers(tree: list[psutil.Process]) -> set[int]:
    """The Ray Train workers in `tree` (Ray titles a worker process by the actor it runs)."""
    workers = set()
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                workers.add(proc.pid)
    return workers


def test_ray_state_goes_under_lsys_home_unless_its_sockets_would_not_fit(tmp_path):
    assert ray_tmpdir(Path("/home/someone/.lsys")) == Path("/home/someone/.lsys/cluster")
    deep = tmp_path / ("d" * 60) / ".lsys"
    short = ray_tmpdir(deep)
    assert short.parent == Path("/tmp") and short.name.startswith("lsys-") and short == ray_tmpdir(deep)
    assert ray_tmpdir(tmp_path / "other") != short  # one per LSYS_HOME
    assert len(str(short)) + _RAY_SOCKET_SUFFIX <= _SOCKET_PATH_MAX


def test_ray_state_directory_is_private_and_not_a_link(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    assert _private_directory(loose).stat().st_mode & 0o777 == 0o700
    assert _private_directory(tmp_path / "new" / "dir").stat().st_mode & 0o777 == 0o700
    (tmp_path / "link").symlink_to(loose)  # a link another user could have planted in /tmp
    with pytest.raises(RuntimeError, match="not a directory owned by this user"):
        _private_directory(tmp_path / "link")


def test_cluster_listens_on_loopback_with_token_auth(home):
    status = json.loads(lsys("cluster", "status", home=home).stdout)
    assert status["num_nodes"] == 2
    assert status["dashboard_url"].startswith("http://127.0.0.1:") and status["gcs_address"].startswith("127.0.0.1:")
    token = home / "cluster" / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    found = listeners(process_tree(status["pid"]))
    assert len(found) > 5  # GCS, 2 raylets, object managers, dashboard, agents...
    assert not exposed(found), exposed(found)


def test_ray_state_lives_in_the_clusters_own_directory(home, default_ray_tmpdir):
    status = json.loads(lsys("cluster", "status", home=home).stdout)
    ray_dir = Path(status["ray_temp_dir"])
    assert ray_dir == home / "cluster" / "ray"  # (tests/test_ray_jobs.py runs clusters whose home is too deep)
    assert ray_dir.parent.stat().st_mode & 0o777 == 0o700  # Ray opens ray_dir to everyone; its parent does not
    assert (ray_dir / "ray_current_cluster").read_text() == status["gcs_address"]
    assert "raylet" in {p.name for p in (ray_dir / "session_latest" / "sockets").iterdir()}
    # The other cluster's default temp dir is as it was: its address file untouched, no session of ours in it.
    assert (default_ray_tmpdir / "ray" / "ray_current_cluster").read_bytes() == OTHER_CLUSTER
    assert [p.name for p in (default_ray_tmpdir / "ray").iterdir()] == ["ray_current_cluster"]


def test_two_worker_job_spans_both_nodes_and_writes_metrics_and_checkpoints(home, tmp_path):
    result = lsys("submit", "configs/demo.yaml", *TWO_WORKERS, "cluster.placement_strategy=STRICT_SPREAD",
                  f"train.run_dir={tmp_path}", "--follow", home=home, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    job_id = result.stdout.splitlines()[0]
    placements = [json.loads((tmp_path / "workers" / f"rank{r}.json").read_text()) for r in range(2)]
    assert placements[0]["node_id"] != placements[1]["node_id"]
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "split" not in r]
    assert steps == [2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["end_step"] == 4 and len(summary["peak_memory_bytes"]) == 2
    status = lsys("jobs", "status", job_id, "--json", home=home)
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    assert lsys("cluster", "status", home=home).returncode == 0  # a cluster started by hand stays up


def test_running_job_listens_on_loopback_only_and_can_be_stopped(home, tmp_path):
    submitted = lsys("submit", "configs/demo.yaml", *TWO_WORKERS, "train.steps=100000", "train.log_every=1",
                     "checkpoint.every=0", f"train.run_dir={tmp_path}", home=home)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    deadline = time.monotonic() + 240
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and read_metrics(metrics)):
        assert time.monotonic() < deadline, lsys("jobs", "logs", job_id, home=home).stdout[-4000:]
        time.sleep(1)
    # While the workers train, nothing the cluster runs (drivers, workers, their gloo connections) listens
    # beyond loopback: on the embedded cluster the ranks rendezvous through a file, not a TCPStore.
    found = set()
    for _ in range(3):
        tree = _daemon_tree(home)
        found.update(listeners(tree))
        time.sleep(0.5)
    workers = _train_workers(tree)
    assert len(workers) == 2 and workers <= {listener.pid for listener in found}, (workers, found)
    assert not exposed(found), exposed(found)
    assert [p.name for p in (tmp_path / "rendezvous").iterdir()]  # the running group's store file
    stopped = lsys("jobs", "stop", job_id, home=home)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "STOPPED", stopped.stdout + stopped.stderr
    # The workers are gone, not just the driver: the metrics stop growing (Ray kills them asynchronously).
    deadline, last = time.monotonic() + 30, -1
    while (count := len(read_metrics(metrics))) != last:
        assert time.monotonic() < deadline, "the workers still train 30 s after the job stopped"
        last = count
        time.sleep(3)
    listed = {j["submission_id"]: j["status"] for j in json.loads(lsys("jobs", "list", "--json", home=home).stdout)}
    assert listed[job_id] == "STOPPED"
