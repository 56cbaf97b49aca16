"""The entry point of an `lsys submit` job: a Ray Train worker group, one worker per rank, running lsys.trainer.

Ray Train owns the rendezvous (it creates the torch process group: gloo for CPU workers, NCCL for GPU workers,
with the config's collective timeout) and the restarts: when a worker dies, the whole group is torn down and
started again up to cluster.max_failures times, and each new group resumes from the newest complete checkpoint
in train.run_dir (directories still being written are never used, see lsys.checkpoint).

On the embedded cluster ($LSYS_EMBEDDED=1, set by `lsys submit`) the ranks meet through a FileStore in
run_dir/rendezvous, so no worker listens for the rendezvous (launch/ray_rendezvous.py). Elsewhere Ray's TCP
rendezvous spans the nodes: its store listens on every interface of rank 0's node while the group lives.

Run by the Jobs API as `python -m launch.ray_train`, with the config `lsys submit` validated in $LSYS_JOB_CONFIG;
or, as the entry point of a job submitted by other means (a KubeRay RayJob, `ray job submit`), as
`python -m launch.ray_train CONFIG [key=value ...]`, which loads and validates the config itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from launch.ray_jobs import CONFIG_ENV, EMBEDDED_ENV


def _record_placement(run_dir: Path, rank: int, optimizer_node_id: str | None) -> None:
    """run_dir/workers/rankN.json: where each rank of the latest attempt runs (node, process), and the node
    holding its offloaded optimizer state."""
    import ray

    directory = run_dir / "workers"
    directory.mkdir(parents=True, exist_ok=True)
    where = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
             "pid": os.getpid(), "optimizer_node_id": optimizer_node_id}
    (directory / f"rank{rank}.json").write_text(json.dumps(where))


def train_worker(loop_config: dict[str, Any]) -> None:
    """One rank, inside the process group Ray Train has set up."""
    import ray.train

    from lsys.config import config_from_dict
    from lsys.trainer import train

    cfg = config_from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    store = None
    if cfg.optim.offload == "cpu":
        from launch.ray_offload import RayOptimizerStore

        store = RayOptimizerStore(cfg.optim, rank)
    _record_placement(Path(cfg.train.run_dir), rank, store.node_id if store else None)
    summary = train(cfg, store)
    if summary["stopped"]:  # train.nonfinite ended the run: the job fails with the reason
        raise RuntimeError(summary["stopped"])


def build_trainer(values: dict[str, Any], *, embedded: bool):
    """A TorchTrainer for the config dict `values` (already validated for cluster.num_workers ranks); `embedded`:
    all workers run on this machine and rendezvous through a file in run_dir/rendezvous."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.ray_rendezvous import FileStoreTorchConfig
    from lsys.config import config_from_dict

    cfg = config_from_dict(values)
    k, run_dir = cfg.cluster, Path(cfg.train.run_dir)
    use_gpu = k.gpus_per_worker > 0
    resources = {"CPU": k.cpus_per_worker, **k.resources_per_worker}
    if use_gpu:
        resources["GPU"] = k.gpus_per_worker
    backend, timeout_s = ("nccl" if use_gpu else "gloo"), int(cfg.train.collective_timeout_s)
    if embedded:
        torch_config = FileStoreTorchConfig(backend=backend, timeout_s=timeout_s,
                                            store_dir=str(run_dir / "rendezvous"))
    else:
        torch_config = TorchConfig(backend=backend, timeout_s=timeout_s)
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": values},
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=k.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=k.placement_strategy),
        # Ray Train's own run state lands in the run directory, beside lsys' metrics and checkpoints.
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=k.max_failures)),
    )


def warn_if_short(cfg) -> None:
    """Ray Train waits until the worker group fits; say so when this cluster cannot hold it now (an autoscaler
    may still add nodes), instead of leaving the user with a job that silently never starts."""
    import ray

    k = cfg.cluster
    need = {"CPU": k.cpus_per_worker, "GPU": k.gpus_per_worker, **k.resources_per_worker}
    have = ray.cluster_resources()
    short = {name: (amount * k.num_workers, have.get(name, 0)) for name, amount in need.items()
             if amount * k.num_workers > have.get(name, 0)}
    if short:
        wanted = ", ".join(f"{name} {want:g} (cluster has {got:g})" for name, (want, got) in short.items())
        print(f"lsys: waiting for resources: {k.num_workers} workers need {wanted}; unless an autoscaler adds "
              "nodes, stop the job and lower cluster.num_workers / cluster.*_per_worker", flush=True)


def main(argv: list[str]) -> None:
    from lsys.config import config_from_dict, load_config, to_dict
    from lsys.validation import validate, validate_for_cluster

    if argv:
        cfg = load_config(argv[0], argv[1:])
        values = to_dict(cfg)
    else:
        values = json.loads(os.environ[CONFIG_ENV])
        cfg = config_from_dict(values)
        validate(cfg)  # `lsys submit` validated it; a hand-made job gets the same checks
    validate_for_cluster(cfg)
    import ray

    ray.init()  # the job's cluster, from RAY_ADDRESS
    warn_if_short(cfg)
    build_trainer(values, embedded=os.environ.get(EMBEDDED_ENV) == "1").fit()


if __name__ == "__main__":
    main(sys.argv[1:])
