"""Jobs on an embedded two-node Ray cluster (a head plus a second node joined to it, both on 127.0.0.1): workers
span the nodes, metrics and checkpoints land in the run directory, and a running job can be stopped."""

from __future__ import annotations

import ipaddress
import json
import time

import psutil
import pytest

from lsys.metrics import read_metrics
from tests.commands import TINY, lsys, two_node_cluster

pytestmark = pytest.mark.slow

TWO_WORKERS = [*TINY, "parallel.dp=1", "parallel.cp_ring=2", "cluster.num_workers=2"]


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1": an IPv6 socket bound to 127.0.0.1
    return (mapped or address).is_loopback


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("lsys-home")) as home:
        yield home


def test_cluster_listens_on_loopback_with_token_auth(home):
    status = json.loads(lsys("cluster", "status", home=home).stdout)
    assert status["num_nodes"] == 2
    assert status["dashboard_url"].startswith("http://127.0.0.1:") and status["gcs_address"].startswith("127.0.0.1:")
    token = home / "cluster" / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    daemon = psutil.Process(status["pid"])
    listening = {(c.laddr.ip, c.laddr.port) for proc in [daemon, *daemon.children(recursive=True)]
                 for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert len(listening) > 5  # GCS, 2 raylets, object managers, dashboard, agents...
    exposed = [(ip, port) for ip, port in listening if not _loopback(ip)]
    assert not exposed, exposed


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


def test_running_job_can_be_stopped(home, tmp_path):
    submitted = lsys("submit", "configs/demo.yaml", *TWO_WORKERS, "train.steps=100000", "train.log_every=1",
                     "checkpoint.every=0", f"train.run_dir={tmp_path}", home=home)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    deadline = time.monotonic() + 240
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and read_metrics(metrics)):
        assert time.monotonic() < deadline, lsys("jobs", "logs", job_id, home=home).stdout[-4000:]
        time.sleep(1)
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
