"""Training jobs on a Ray cluster through the Ray Jobs API: submit, follow, list, stop, and an archive that keeps
the jobs of an embedded cluster readable after it has shut down."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from launch.local import cuda_allocator_environment, loopback_interface

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
CONFIG_ENV = "LSYS_JOB_CONFIG"  # the validated config, as JSON, for the job's entry point
EMBEDDED_ENV = "LSYS_EMBEDDED"  # "1": the job runs on the embedded cluster, all of its workers on this machine
SUBMIT_RETRY_S = 60.0


@dataclass(frozen=True)
class JobRecord:
    """What `lsys jobs` shows of one job, from a live cluster or from the archive."""

    submission_id: str
    status: str
    message: str
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    metadata: dict[str, str]

    @property
    def duration_s(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _record(details: Any) -> JobRecord:
    def seconds(ms: int | None) -> float | None:
        return None if not ms else ms / 1000

    return JobRecord(details.submission_id, str(details.status.value if hasattr(details.status, "value")
                                                 else details.status),
                     details.message or "", seconds(details.start_time), seconds(details.end_time),
                     dict(details.metadata or {}))


def list_job_infos(address: str) -> list[JobRecord]:
    """Jobs submitted through the Jobs API (drivers started by hand have no submission id and are skipped)."""
    return [_record(job) for job in _client(address).list_jobs() if job.submission_id]


def submission_id(run_dir: str) -> str:
    """Readable and unique enough: the run directory's name and the submit time."""
    return f"lsys-{Path(run_dir).name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def submit(address: str, config: dict[str, Any], *, embedded: bool) -> str:
    """Submit `config` (already validated) as a job that runs launch.ray_train; returns the submission id.

    The entry point is built from fixed words only (no user input reaches a shell): the config travels as an
    environment variable. On the embedded cluster the job uses this interpreter (the cluster was started by it),
    gloo binds to loopback and the ranks rendezvous through a file (launch/ray_rendezvous.py); elsewhere it uses
    the cluster's `python`, whose environment must have lsys installed (the images in docker/ do).
    """
    python = sys.executable if embedded else "python"
    env = {CONFIG_ENV: json.dumps(config)}
    interface = loopback_interface() if embedded else None
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
        env["NCCL_SOCKET_IFNAME"] = interface
    if embedded:
        env[EMBEDDED_ENV] = "1"
        # Its workers are local ranks; on a remote cluster the nodes' own setting is left alone.
        env.update(cuda_allocator_environment(os.environ))
    client = _client(address)
    request = {
        "entrypoint": shlex.join([python, "-m", "launch.ray_train"]),
        "submission_id": submission_id(config["train"]["run_dir"]),
        "runtime_env": {"env_vars": env},
        "metadata": {"run_dir": config["train"]["run_dir"], "workers": str(config["cluster"]["num_workers"])},
        "entrypoint_num_cpus": 0,  # the driver only waits on the worker group; keep every CPU for the ranks
    }
    # A busy head may answer "try again later" or drop the connection; a retried request that the first one
    # did reach finds its submission id taken.
    import requests

    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            return client.submit_job(**request)
        except (RuntimeError, requests.ConnectionError) as exc:
            if "already exists" in str(exc):
                return request["submission_id"]
            transient = isinstance(exc, requests.ConnectionError) or "No available agent" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def stop(address: str, job_id: str, timeout_s: float = 60.0) -> str:
    """Stop a job and wait until it has stopped; returns its final status."""
    client = _client(address)
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def follow(address: str, job_id: str, write: Callable[[str], None], poll_s: float = 1.0) -> JobRecord:
    """Stream the job's log (new text as it appears) until the job ends; returns its final record."""
    client = _client(address)
    shown = 0
    while True:
        record = _record(client.get_job_info(job_id))  # status first: logs read after it are complete
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            write(logs[shown:])
            shown = len(logs)
        if record.status in TERMINAL:
            return record
        time.sleep(poll_s)


def job_logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


# -- the archive ----------------------------------------------------------------------------------------------


def archive_dir(home: Path) -> Path:
    return home / "jobs"


def archive_jobs(address: str, home: Path) -> None:
    """Save every job's record and log under LSYS_HOME/jobs (done when the embedded cluster shuts down)."""
    client = _client(address)
    for record in list_job_infos(address):
        directory = archive_dir(home) / record.submission_id
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "log").write_text(client.get_job_logs(record.submission_id))
        (directory / "job.json").write_text(json.dumps(asdict(record), indent=2))


def archived_jobs(home: Path) -> list[JobRecord]:
    root = archive_dir(home)
    if not root.is_dir():
        return []
    return [JobRecord(**json.loads(p.read_text())) for p in sorted(root.glob("*/job.json"))]


def archived_log(home: Path, job_id: str) -> str | None:
    path = archive_dir(home) / job_id / "log"
    return path.read_text() if path.is_file() else None
