"""The Ray commands of the `lsys` CLI: `submit`, `jobs list|status|logs|stop` and `cluster start|status|stop`.

Which cluster: `--address`, else $RAY_ADDRESS, else the embedded one on this machine (started by `submit` when
none is running). With no cluster at all, `jobs` reads the jobs archived when the embedded cluster shut down.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from launch import exits

IDLE_STOP_S = 60.0  # an embedded cluster started by a submit without --follow stops this long after its last job
ADDRESS_HELP = ("Ray dashboard address of the cluster, e.g. http://HEAD:8265 (default: $RAY_ADDRESS, else the "
                "embedded cluster on this machine)")


def add_commands(sub: argparse._SubParsersAction, config_help: str) -> None:
    p = sub.add_parser("submit", help="submit a training job to a Ray cluster (embedded local one by default)",
                       description="Submit a training job through the Ray Jobs API: one Ray Train worker per rank "
                                   "(cluster.num_workers), restarts from the last checkpoint up to "
                                   "cluster.max_failures times. " + config_help)
    p.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. configs/demo.yaml")
    p.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key=value config overrides")
    p.add_argument("--address", default=None, help=ADDRESS_HELP)
    p.add_argument("--follow", action="store_true",
                   help="stream the job's log until it ends; the exit status is 0 only if it succeeded")
    p.add_argument("--keep-cluster", action="store_true",
                   help="leave an embedded cluster started by this command running after the job (default: it "
                        f"stops when the job ends, or {IDLE_STOP_S:.0f} s after the last job without --follow)")
    p.add_argument("--nodes", type=int, default=1,
                   help="nodes of the embedded cluster when this command starts it (default 1; more rehearse a "
                        "multi-node run on one machine)")
    p.set_defaults(handler=submit_command)

    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs",
                          description="Manage jobs submitted with `lsys submit`.")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION",
                                  help="what to do; `lsys jobs ACTION --help` lists its options")
    listing = actions.add_parser("list", help="every job with its status, run directory and duration")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status = actions.add_parser("status", help="one job's status and message")
    status.add_argument("--json", action="store_true", help="print JSON")
    logs = actions.add_parser("logs", help="a job's log")
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    stop = actions.add_parser("stop", help="stop a running job and wait until it has stopped")
    for action in (status, logs, stop):
        action.add_argument("job_id", metavar="JOB_ID", help="the id `lsys submit` printed")
    for action in (listing, status, logs, stop):
        action.add_argument("--address", default=None, help=ADDRESS_HELP)
    jobs.set_defaults(handler=jobs_command)

    cluster = sub.add_parser("cluster", help="start, inspect or stop the embedded Ray cluster on this machine",
                             description="The embedded cluster binds only to 127.0.0.1 and uses token auth. "
                                         "State lives in $LSYS_HOME (default ~/.lsys).")
    cactions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION",
                                      help="what to do; `lsys cluster ACTION --help` lists its options")
    start = cactions.add_parser("start", help="start it and keep it running until `lsys cluster stop`")
    start.add_argument("--nodes", type=int, default=1, help="Ray nodes to start (default 1)")
    start.add_argument("--cpus-per-node", type=int, default=None, help="logical CPUs per node (default: all cores)")
    start.add_argument("--dashboard-port", type=int, default=0, help="dashboard / Jobs API port (default: a free one)")
    start.add_argument("--stop-when-idle", type=float, default=0.0, metavar="SECONDS",
                       help="stop once no job has been waiting or running for this long (default 0: never)")
    cactions.add_parser("status", help="whether it runs, and its addresses")
    cactions.add_parser("stop", help="archive its jobs and shut it down")
    cluster.set_defaults(handler=cluster_command)


def _embedded_env(home: Path) -> None:
    from launch.ray_cluster import client_environment

    os.environ.update(client_environment(home))


def _resolve(address: str | None) -> tuple[str | None, Path | None]:
    """(dashboard address or None when no cluster runs, the LSYS_HOME whose archive counts or None for a user's
    cluster); sets up the client environment for the embedded cluster."""
    from launch.ray_cluster import lsys_home, running_cluster

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return address, None
    home = lsys_home()
    state = running_cluster(home)
    if state is None:
        return None, home
    _embedded_env(home)
    return state.dashboard_url, home


def _absolute_paths(values: dict, remote: bool) -> None:
    """Jobs do not run in the submitter's directory: relative paths are made absolute here, and refused for a
    remote cluster, where they would name a place on the cluster's machines."""
    text = values["data"]["text"]
    paths = {"train.run_dir": values["train"], "data.text.path": text, "data.text.cache_dir": text,
             "model.pretrained": values["model"]}
    for key, section in paths.items():
        field = key.rsplit(".", 1)[1]
        if not section[field] or Path(section[field]).is_absolute():
            continue
        if remote:
            raise ValueError(f"{key}={section[field]!r}: a job on a remote cluster needs an absolute path on "
                             "storage its nodes share; give one")
        section[field] = str(Path(section[field]).resolve())


def submit_command(args: argparse.Namespace, console: Console) -> int:
    from launch import ray_jobs
    from launch.preflight import check_run
    from launch.ray_cluster import (
        check_fits,
        lsys_home,
        planned_shape,
        running_cluster,
        start_cluster,
        stop_cluster,
    )
    from lsys.config import load_config, to_dict
    from lsys.packages import require
    from lsys.validation import validate_for_cluster

    try:
        require("ray", "lsys submit", "submitting a job")
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    address = args.address or os.environ.get("RAY_ADDRESS")
    embedded = not address
    home, started = lsys_home(), False
    if embedded:
        _embedded_env(home)  # before anything imports ray: it reads the auth mode once
    try:
        cfg = load_config(args.config, args.overrides)
        validate_for_cluster(cfg)
        values = to_dict(cfg)
        _absolute_paths(values, remote=not embedded)
        if args.nodes < 1:
            raise ValueError(f"--nodes={args.nodes}: start at least one node")
        if embedded:
            k = cfg.cluster
            check_fits(*planned_shape(home, args.nodes), k.num_workers, k.cpus_per_worker, k.gpus_per_worker)
            # Its workers run on this machine, on these files: the same checks as `lsys train`.
            check_run(cfg, k.num_workers, local_ranks=k.num_workers)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    if embedded:
        state = running_cluster(home)
        if state is None:
            console.print(f"lsys: starting an embedded Ray cluster on 127.0.0.1 ({args.nodes} node(s))")
            try:
                state = start_cluster(home, num_nodes=args.nodes,
                                      stop_when_idle_s=0.0 if args.keep_cluster else IDLE_STOP_S)
            except RuntimeError as exc:
                console.print(f"[bold red]lsys:[/] {exc}", highlight=False)
                return 1
            started = True
        address = state.dashboard_url
    try:
        job_id = ray_jobs.submit(address, values, embedded=embedded)
    except (OSError, RuntimeError) as exc:  # requests' connection errors are OSErrors
        console.print(f"[bold red]lsys: the Ray cluster at {address} did not take the job:[/] {exc}", highlight=False)
        if started:
            stop_cluster(home)
        return 1
    print(job_id, flush=True)
    if not args.follow:
        console.print(f"lsys: follow with `lsys jobs logs {job_id} --follow`; "
                      f"run directory {values['train']['run_dir']}")
        return 0
    try:
        record = ray_jobs.follow(address, job_id, lambda text: print(text, end="", flush=True))
    except KeyboardInterrupt:
        console.print(f"\nlsys: stopped following; the job keeps running (`lsys jobs stop {job_id}` stops it)"
                      + (f"; the embedded cluster stops {IDLE_STOP_S:.0f} s after it ends" if started else ""))
        return 130
    if started and not args.keep_cluster:
        stop_cluster(home)
    colour = "green" if record.status == "SUCCEEDED" else "red"
    console.print(f"lsys: job {job_id} [bold {colour}]{record.status}[/]: {record.message}", highlight=False)
    return 0 if record.status == "SUCCEEDED" else 1


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _records(address: str | None, home: Path | None) -> tuple[list, set[str]]:
    """(live jobs plus, for the embedded cluster, those archived by earlier ones, oldest first; the live ids)."""
    from launch import ray_jobs

    archived = {r.submission_id: r for r in ray_jobs.archived_jobs(home)} if home is not None else {}
    live = {r.submission_id: r for r in ray_jobs.list_job_infos(address)} if address else {}
    return sorted({**archived, **live}.values(), key=lambda r: r.start_time or 0), set(live)


def jobs_command(args: argparse.Namespace, console: Console) -> int:
    from launch import ray_jobs
    from lsys.packages import require

    address, home = _resolve(args.address)
    if address is not None:  # without one, only the archive of the embedded cluster is read
        try:
            require("ray", f"lsys jobs {args.action}", "a running cluster")
        except ValueError as exc:
            return exits.invalid_input(console, exc)
    if args.action == "list":
        records, _ = _records(address, home)
        if args.json:
            print(json.dumps([asdict(r) for r in records], indent=2))
            return 0
        table = Table("JOB ID", "STATUS", "STARTED", "DURATION", "WORKERS", "RUN DIR", "MESSAGE", box=None)
        for r in records:
            duration = "-" if r.duration_s is None else f"{r.duration_s:.0f} s"
            table.add_row(r.submission_id, r.status, _when(r.start_time), duration, r.metadata.get("workers", "-"),
                          r.metadata.get("run_dir", "-"), r.message.splitlines()[0][:60] if r.message else "")
        Console(soft_wrap=True).print(table)
        return 0
    records, live_ids = _records(address, home)
    known = {r.submission_id: r for r in records}
    if args.job_id not in known:
        where = f"the cluster at {address}" if address else "the archive (no cluster is running)"
        unknown = ValueError(f"job {args.job_id!r} is not known to {where}; `lsys jobs list` shows the jobs there are")
        return exits.invalid_input(console, unknown)
    live = args.job_id in live_ids
    if args.action == "status":
        record = known[args.job_id]
        print(json.dumps(asdict(record), indent=2) if args.json else f"{record.status}: {record.message}")
    elif args.action == "logs":
        if live and args.follow:
            record = ray_jobs.follow(address, args.job_id, lambda text: print(text, end="", flush=True))
            return 0 if record.status == "SUCCEEDED" else 1
        text = ray_jobs.job_logs(address, args.job_id) if live else ray_jobs.archived_log(home, args.job_id)
        print(text or "", end="")
    elif args.action == "stop":
        if not live:
            archived = ValueError(f"job {args.job_id!r} is archived ({known[args.job_id].status}); only jobs on a "
                                  "running cluster can be stopped")
            return exits.invalid_input(console, archived)
        print(ray_jobs.stop(address, args.job_id))
    return 0


def cluster_command(args: argparse.Namespace, console: Console) -> int:
    from launch.ray_cluster import lsys_home, running_cluster, start_cluster, stop_cluster
    from lsys.packages import require

    home = lsys_home()
    if args.action == "start":
        try:
            require("ray", "lsys cluster start", "the embedded cluster")
            state = start_cluster(home, num_nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                                  dashboard_port=args.dashboard_port, stop_when_idle_s=args.stop_when_idle)
        except (ValueError, RuntimeError) as exc:
            return exits.invalid_input(console, exc)
        console.print(f"lsys: embedded Ray cluster up ({state.num_nodes} node(s)); jobs API {state.dashboard_url}")
    elif args.action == "status":
        state = running_cluster(home)
        if state is None:
            print("no embedded cluster is running")
            return 1
        print(json.dumps(asdict(state), indent=2))
    elif args.action == "stop":
        print("stopped" if stop_cluster(home) else "no embedded cluster was running")
    return 0

