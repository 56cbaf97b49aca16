"""The embedded Ray cluster: a head (plus, to rehearse multi-node runs, more nodes) on this machine, loopback only.

`lsys submit` without an address starts one or reuses the running one; `lsys cluster start|status|stop` manage it
by hand. A small daemon process owns the Ray nodes and records how to reach them in `LSYS_HOME/cluster/state.json`.

Why a daemon built on `ray.cluster_utils.Cluster` and not `ray start`: `ray start --node-ip-address=127.0.0.1`
rewrites a loopback address to the machine's external one, after which the dashboard agent cannot reach the GCS
and the Jobs API times out. Nodes created in-process with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keep every socket
on 127.0.0.1, and one process can add a second node that joins the head as a separate raylet.

Security: every server binds to 127.0.0.1 and the cluster runs in token auth mode with a fresh token in a 0600
file; clients of this cluster (this CLI, job drivers, workers) present it. Ray's temp dir (sessions, Unix sockets,
logs, `ray_current_cluster`) is this cluster's own, inside a directory only this user may enter, not the
machine-wide /tmp/ray that any other Ray on the machine uses (see `ray_tmpdir`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from launch._ray_compat import gpus_on_this_machine, job_agent_check

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0
# Ray's longest Unix socket path below RAY_TMPDIR: a session of a 7-digit pid, and a socket name of up to 20 bytes
# (ray 2.60's longest is the dashboard's "dash_MetricsHead"); and the most bytes a Unix socket path may have (108
# with the terminating NUL).
_RAY_SOCKET_SUFFIX = len("/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/") + 20
_SOCKET_PATH_MAX = 107


def lsys_home() -> Path:
    """Where lsys keeps cluster state and archived jobs: $LSYS_HOME, default ~/.lsys."""
    return Path(os.environ.get("LSYS_HOME") or Path.home() / ".lsys")


def cluster_dir(home: Path) -> Path:
    return home / "cluster"


def client_environment(home: Path) -> dict[str, str]:
    """Variables a Ray client of the embedded cluster needs: explicit token auth, and no rewriting of 127.0.0.1
    into an external address."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(cluster_dir(home) / "token"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }


@dataclass(frozen=True)
class ClusterState:
    pid: int
    gcs_address: str
    dashboard_url: str
    num_nodes: int
    cpus_per_node: int
    gpus: int  # all on the head
    stop_when_idle_s: float  # 0: keep running until `lsys cluster stop`
    started_at: float
    ray_temp_dir: str  # the cluster's Ray sessions, sockets and logs


def _state_path(home: Path) -> Path:
    return cluster_dir(home) / "state.json"


def _alive(pid: int) -> bool:
    """A daemon that exited stays a zombie until its parent (maybe this process) reaps it: that is not alive."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running_cluster(home: Path) -> ClusterState | None:
    """The embedded cluster recorded under `home` if its daemon is still alive (stale records are removed)."""
    path = _state_path(home)
    try:
        state = ClusterState(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def start_cluster(home: Path, *, num_nodes: int = 1, cpus_per_node: int | None = None, dashboard_port: int = 0,
                  stop_when_idle_s: float = 0.0) -> ClusterState:
    """Start the daemon and wait until the Jobs API answers. Raises RuntimeError (with the daemon's log tail) if
    it does not come up, and refuses when a cluster is already running under `home`."""
    if running_cluster(home) is not None:
        raise RuntimeError(f"an embedded cluster is already running (LSYS_HOME={home}); `lsys cluster stop` first")
    if num_nodes < 1:
        raise ValueError(f"--nodes={num_nodes}: start at least one node")
    directory = cluster_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    token = directory / "token"
    token.unlink(missing_ok=True)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    command = [sys.executable, "-m", "launch.ray_cluster", "--home", str(home), "--nodes", str(num_nodes),
               "--dashboard-port", str(dashboard_port), "--stop-when-idle", str(stop_when_idle_s)]
    if cpus_per_node is not None:
        command += ["--cpus-per-node", str(cpus_per_node)]
    log = directory / "daemon.log"
    with log.open("w") as out:
        # Its own session: Ctrl-C in the terminal that submitted a job must not take the cluster down with it.
        daemon = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, env={**os.environ, **client_environment(home)})
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        state = running_cluster(home)
        if state is not None and state.pid == daemon.pid:
            return state
        if daemon.poll() is not None:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(daemon.pid, signal.SIGTERM)
    tail = "\n".join(log.read_text().splitlines()[-20:])
    raise RuntimeError(f"the embedded Ray cluster did not start (log: {log}):\n{tail}")


def stop_cluster(home: Path, timeout_s: float = 60.0) -> bool:
    """Ask the daemon to archive its jobs and shut its nodes down; False if none was running."""
    state = running_cluster(home)
    if state is None:
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(state.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(state.pid):
        os.killpg(state.pid, signal.SIGKILL)
    _state_path(home).unlink(missing_ok=True)
    return True


def check_fits(num_nodes: int, cpus_per_node: int, gpus: int, workers: int, cpus: float, gpu_each: float) -> None:
    """ValueError unless `workers` workers of `cpus` CPUs and `gpu_each` GPUs can run at once on an embedded
    cluster of this shape: Ray would otherwise wait for resources forever."""
    per_node = int(cpus_per_node // cpus) if cpus else workers
    if workers > per_node * num_nodes:
        raise ValueError(f"cluster.cpus_per_worker={cpus:g}: {workers} workers need {workers * cpus:g} CPUs but the "
                         f"embedded cluster has {num_nodes} node(s) x {cpus_per_node} CPUs; lower it to "
                         f"{cpus_per_node * num_nodes / workers:g} or start the cluster with more nodes or CPUs")
    if gpu_each and workers * gpu_each > gpus:
        raise ValueError(f"cluster.gpus_per_worker={gpu_each:g}: {workers} workers need {workers * gpu_each:g} GPUs "
                         f"but this machine has {gpus}; lower cluster.num_workers and the parallel degrees")


def planned_shape(home: Path, num_nodes: int) -> tuple[int, int, int]:
    """(nodes, CPUs per node, GPUs) of the running embedded cluster, or of the one `start_cluster` would start."""
    state = running_cluster(home)
    if state is not None:
        return state.num_nodes, state.cpus_per_node, state.gpus
    return num_nodes, os.cpu_count() or 1, gpus_on_this_machine()


# -- the daemon ---------------------------------------------------------------------------------------------


def ray_tmpdir(home: Path) -> Path:
    """The RAY_TMPDIR of the cluster under `home` (Ray keeps everything in its `ray/` subdirectory): LSYS_HOME/cluster,
    or, when that is too deep for Ray's Unix socket paths (about 23 bytes of LSYS_HOME fit), /tmp/lsys-<hash of
    LSYS_HOME>."""
    home = home.absolute()
    preferred = cluster_dir(home)
    if len(os.fsencode(preferred)) + _RAY_SOCKET_SUFFIX <= _SOCKET_PATH_MAX:
        return preferred
    return Path("/tmp", f"lsys-{hashlib.sha256(os.fsencode(home)).hexdigest()[:12]}")


def _private_directory(path: Path) -> Path:
    """`path`, created with mode 0700, or refused unless it is a directory of this user (then made 0700): Ray makes
    its own temp dir writable by everyone, so the directory above it must keep other users out."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RuntimeError(f"{path} is not a directory owned by this user; remove it, it holds the embedded cluster's "
                           "Ray state")
    path.chmod(0o700)
    return path


def _node_args(index: int, cpus: int, gpus: int) -> dict:
    """Node `index` (0: the head) carries the resource lsys_node_<index> and the label lsys-node=<index>, so a
    job can aim workers or optimizer state at a given node (cluster.resources_per_worker, optim.placement)."""
    return {"node_ip_address": LOOPBACK, "num_cpus": cpus, "num_gpus": gpus,
            "resources": {f"lsys_node_{index}": 1.0}, "labels": {"lsys-node": str(index)},
            "object_store_memory": 300 * 2**20}  # tensors travel over torch.distributed, not the object store


def _wait_for_jobs_api(url: str, gcs_address: str, head_node_id: str) -> None:
    """Until the Jobs API answers AND the head's job agent has registered: the dashboard answers first, and a job
    submitted before the agent is known fails ("No available agent") or has its connection dropped."""
    from ray.job_submission import JobSubmissionClient

    agent_registered = job_agent_check(gcs_address, head_node_id)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            if agent_registered(5):
                return
        except Exception:  # the dashboard answers with various errors while it starts
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"the head's job agent did not register within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def _idle_since(url: str, since: float) -> float:
    """When the cluster last became idle (no job waiting or running): `since`, or now while a job is busy."""
    from launch.ray_jobs import TERMINAL, list_job_infos

    if any(job.status not in TERMINAL for job in list_job_infos(url)):
        return time.monotonic()
    return since


def serve(home: Path, num_nodes: int, cpus_per_node: int, dashboard_port: int, stop_when_idle_s: float) -> None:
    # Through the environment (set before Ray is imported), not the nodes' temp_dir argument: Cluster writes, and on
    # shutdown deletes, the ray_current_cluster file of the default temp dir, which RAY_TMPDIR moves; the raylets,
    # job drivers and workers inherit it too.
    os.environ["RAY_TMPDIR"] = str(_private_directory(ray_tmpdir(home)))
    from ray.cluster_utils import Cluster

    from launch.local import free_port
    from launch.ray_jobs import archive_jobs

    stop = threading.Event()
    port = dashboard_port or free_port()
    gpus = gpus_on_this_machine()
    # The head's dashboard agent would take Ray's fixed default port, which a second cluster on this machine
    # (another LSYS_HOME, another user) already holds; its jobs would then wait for an agent forever.
    head = {**_node_args(0, cpus_per_node, gpus), "include_dashboard": True, "dashboard_host": LOOPBACK,
            "dashboard_port": port, "dashboard_agent_listen_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for index in range(1, num_nodes):
            cluster.add_node(**_node_args(index, cpus_per_node, 0))
        # After the nodes: Ray's own handler would drain for 30 s and skip the archive.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        url = f"http://{LOOPBACK}:{port}"
        _wait_for_jobs_api(url, cluster.address, cluster.head_node.node_id)
        state = ClusterState(os.getpid(), cluster.address, url, num_nodes, cpus_per_node, gpus, stop_when_idle_s,
                             time.time(), cluster.head_node.get_temp_dir_path())
        tmp = _state_path(home).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(_state_path(home))
        print(f"lsys: embedded Ray cluster up: {num_nodes} node(s), GCS {cluster.address}, jobs API {url}", flush=True)
        idle_since = time.monotonic()  # a cluster whose submitter never got a job in stops too
        while not stop.wait(2.0):
            if stop_when_idle_s:
                idle_since = _idle_since(url, idle_since)
                if time.monotonic() - idle_since > stop_when_idle_s:
                    print(f"lsys: no job for {stop_when_idle_s:.0f} s; stopping the embedded cluster", flush=True)
                    break
        archive_jobs(url, home)
    finally:
        _state_path(home).unlink(missing_ok=True)
        cluster.shutdown()


def _main() -> None:
    parser = argparse.ArgumentParser(description="lsys embedded Ray cluster daemon (started by `lsys`)")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--cpus-per-node", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dashboard-port", type=int, default=0)
    parser.add_argument("--stop-when-idle", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.home, args.nodes, args.cpus_per_node, args.dashboard_port, args.stop_when_idle)


if __name__ == "__main__":
    _main()
