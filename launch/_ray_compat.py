"""Ray's private APIs that lsys uses, fenced in one module (tested with ray 2.60.0).

Ray promises nothing about these. Each is imported on first use, through `PRIVATE` (importing Ray, and Ray Train
even more so, is slow, and the CLI and the cluster daemon need only a few of them); a Ray that lacks one fails with
a RuntimeError naming it and the tested version. tests/test_compat.py looks every one up on the installed Ray.

- the embedded cluster: how many GPUs this machine has, before any Ray runs (its nodes declare them), and whether
  the head's job agent has registered in the GCS (the Jobs API answers before it has);
- the file rendezvous of Ray Train workers (launch/ray_rendezvous.py): the backend TorchConfig selects, which it
  extends; the helper that exports RANK/WORLD_SIZE/LOCAL_RANK to the workers, which Ray's own on_start calls
  before the rendezvous; and the v1 worker group, which does so in on_training_start instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

TESTED_RAY = "2.60.0"

# name here -> (module, name there)
PRIVATE = {
    "NvidiaGPUAcceleratorManager": ("ray._private.accelerators", "NvidiaGPUAcceleratorManager"),
    "GcsClient": ("ray._raylet", "GcsClient"),
    "KV_NAMESPACE_DASHBOARD": ("ray._private.ray_constants", "KV_NAMESPACE_DASHBOARD"),
    "DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX": ("ray.dashboard.consts", "DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX"),
    "TorchBackend": ("ray.train.torch.config", "_TorchBackend"),
    "set_torch_distributed_env_vars": ("ray.train.torch.config", "_set_torch_distributed_env_vars"),
    "V1WorkerGroup": ("ray.train._internal.worker_group", "WorkerGroup"),
}


def __getattr__(name: str) -> Any:
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _lookup(name)


def _lookup(name: str) -> Any:
    module, there = PRIVATE[name]
    try:
        return getattr(importlib.import_module(module), there)
    except (ImportError, AttributeError) as e:
        import ray

        raise RuntimeError(f"ray {ray.__version__} has no {module}.{there}, which lsys uses (tested with ray "
                           f"{TESTED_RAY})") from e


def gpus_on_this_machine() -> int:
    return _lookup("NvidiaGPUAcceleratorManager").get_current_node_num_accelerators()


def job_agent_check(gcs_address: str, node_id: str) -> Callable[[float], bool]:
    """A function of a timeout in seconds: whether node `node_id`'s job (dashboard) agent has registered, which it
    does by writing its address under a key of the dashboard's namespace in the GCS."""
    gcs = _lookup("GcsClient")(address=gcs_address)
    key = f"{_lookup('DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX')}{node_id}".encode()
    namespace = _lookup("KV_NAMESPACE_DASHBOARD")
    return lambda timeout: bool(gcs.internal_kv_get(key, namespace=namespace, timeout=timeout))
