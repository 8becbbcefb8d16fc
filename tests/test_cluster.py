"""cluster/: the Ray cluster-launcher configs and the KubeRay manifest are valid and closed to the internet.

Offline and fast: nothing here contacts a cloud or starts Ray.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_PORTS = (6379, 8265, 10001)  # GCS, dashboard, Ray client
ANYWHERE = {"0.0.0.0/0", "::/0"}


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _launcher_configs() -> list[str]:
    """Every cluster/*.yaml that is a single cluster-launcher document (it has a `provider`)."""
    names = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs = _documents(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
            names.append(path.name)
    return names


LAUNCHER_CONFIGS = _launcher_configs()


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(config: dict) -> None:
    # prepare_config only merges the provider's bundled defaults.yaml, the setup commands and the node types'
    # min/max workers: nothing in it contacts the cloud, so the whole of it runs here. The steps that do (IAM
    # role, key pair, subnets, security groups) are the provider's bootstrap_config, which only `ray up` runs.
    validate_config(prepare_config(copy.deepcopy(config)))


def _covers(low, high, port: int) -> bool:
    if low in (None, -1) or high in (None, -1):
        return True
    return int(low) <= port <= int(high)


def _gcp_ports(allowed: dict) -> list[tuple]:
    ports = allowed.get("ports")
    if not ports:
        return [(None, None)]
    ranges = []
    for port in ports:
        low, _, high = str(port).partition("-")
        ranges.append((low, high or low))
    return ranges


def _open_ray_ports(node) -> list:
    """Every inbound rule, anywhere in a config, that lets the internet reach a Ray port.

    Understands AWS IpPermissions (FromPort/ToPort, IpRanges/Ipv6Ranges; protocol -1 means every port) and
    GCP firewall rules (sourceRanges + allowed[].ports).
    """
    found = []
    if isinstance(node, dict):
        cidrs = {r.get("CidrIp") for r in node.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in node.get("Ipv6Ranges", [])
        }
        if cidrs & ANYWHERE:
            every = str(node.get("IpProtocol")) == "-1"
            if any(every or _covers(node.get("FromPort"), node.get("ToPort"), p) for p in RAY_PORTS):
                found.append(node)
        if set(node.get("sourceRanges", [])) & ANYWHERE and node.get("direction", "INGRESS") == "INGRESS":
            for allowed in node.get("allowed", []):
                if any(_covers(lo, hi, p) for lo, hi in _gcp_ports(allowed) for p in RAY_PORTS):
                    found.append(node)
        for value in node.values():
            found += _open_ray_ports(value)
    elif isinstance(node, list):
        for value in node:
            found += _open_ray_ports(value)
    return found


def _worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# --- launcher configs ---------------------------------------------------------------------------------------


def test_the_aws_and_gcp_configs_are_launcher_configs():
    assert {"gpu.yaml", "gcp.yaml"} <= set(LAUNCHER_CONFIGS)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name):
    _validate(_load(name))


def _set_max_workers_to_words(config):
    config["max_workers"] = "many"


def _add_unknown_top_level_key(config):
    config["gpu_count"] = 4


def _give_a_node_type_a_fractional_cpu(config):
    config["available_node_types"][config["head_node_type"]]["resources"] = {"CPU": 0.5}


def _misspell_a_node_type_key(config):
    worker = next(iter(_worker_types(config).values()))
    worker["min_worker"] = worker.pop("min_workers")


def _name_a_missing_head_type(config):
    config["head_node_type"] = "no-such-type"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize(
    "breakage",
    [
        _set_max_workers_to_words,
        _add_unknown_top_level_key,
        _give_a_node_type_a_fractional_cpu,
        _misspell_a_node_type_key,
        _name_a_missing_head_type,
    ],
)
def test_a_broken_copy_fails_validation(name, breakage):
    config = _load(name)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(config)


def test_the_port_check_catches_open_rules():
    aws = {
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ]
    }
    aws_all = {"IpPermissions": [{"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}]}
    gcp = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["10001"]}]}
    ssh_office = {
        "IpPermissions": [
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "203.0.113.7/32"}]}
        ]
    }
    ssh_world = {"sourceRanges": ["0.0.0.0/0"], "allowed": [{"IPProtocol": "tcp", "ports": ["22"]}]}
    assert _open_ray_ports(aws) and _open_ray_ports(aws_all) and _open_ray_ports(gcp)
    assert not _open_ray_ports(ssh_office) and not _open_ray_ports(ssh_world)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_no_ray_port_is_open_to_the_internet(name):
    config = _load(name)
    assert _open_ray_ports(config) == []
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_aws_nodes_use_the_users_security_group():
    """Without SecurityGroupIds the launcher creates its own group, which always admits SSH from 0.0.0.0/0."""
    config = _load("gpu.yaml")
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("SecurityGroupIds"), name
    assert _open_ray_ports(config["provider"].get("security_group", {})) == []


def test_gcp_nodes_use_their_own_network():
    """Without networkInterfaces the launcher uses the project's first subnet, usually the default network's."""
    config = _load("gcp.yaml")
    for name, node_type in config["available_node_types"].items():
        interfaces = node_type["node_config"].get("networkInterfaces")
        assert interfaces, name
        for interface in interfaces:
            assert "subnetwork" in interface and not interface["subnetwork"].endswith("/default"), name


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_the_head_offers_no_cpu_to_trials(name):
    config = _load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert "GPU" not in head["resources"]
    assert any("--num-cpus=0" in cmd for cmd in config["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_gpu_workers_autoscale_from_zero(name):
    config = _load(name)
    gpu_types = {k: v for k, v in _worker_types(config).items() if v.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0
        assert 1 <= node_type["max_workers"] <= config["max_workers"]
        assert node_type["resources"].get("CPU", 0) >= 1
    assert config["idle_timeout_minutes"] == 10


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_results_share_reaches_every_node(name):
    """Ray Train needs the results directory at one path on every node: the head's NFS share."""
    config = _load(name)
    assert "--volume=/mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    assert any("exportfs" in cmd for cmd in config["initialization_commands"])
    for node_type in _worker_types(config).values():
        mounts = [c for c in node_type["initialization_commands"] if "mount -t nfs4" in c]
        assert mounts and "$RAY_HEAD_IP:/mnt/shared" in mounts[0]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_file_mounts_point_at_files_in_the_repo(name):
    for local in _load(name)["file_mounts"].values():
        assert (ROOT / local).exists(), local
    assert (ROOT / "search_spaces" / "gpu.yaml").exists()


# --- KubeRay ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuberay() -> list:
    return _documents(CLUSTER / "kuberay.yaml")


def _ray_cluster(docs: list) -> dict:
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def test_kuberay_manifest_is_a_raycluster(kuberay):
    cluster = _ray_cluster(kuberay)
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    assert all({"apiVersion", "kind", "metadata", "spec"} <= set(d) for d in kuberay)


def test_kuberay_gpu_workers_autoscale_from_zero(kuberay):
    spec = _ray_cluster(kuberay)["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            if "nvidia.com/gpu" in resources.get("limits", {}):
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
                gpu_groups.append(group)
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1


def test_kuberay_head_is_not_exposed(kuberay):
    head = _ray_cluster(kuberay)["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1"
    for doc in kuberay:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        if doc["kind"] == "Ingress":
            pytest.fail("the manifest must not expose the cluster through an Ingress")


def test_kuberay_pods_share_the_results_volume(kuberay):
    spec = _ray_cluster(kuberay)["spec"]
    claims = {
        d["metadata"]["name"]
        for d in kuberay
        if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]
    }
    for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
        assert volumes.get(mounts.get("/mnt/shared")) in claims


def test_every_config_runs_the_same_ray_image(kuberay):
    images = {_load(name)["docker"]["image"] for name in LAUNCHER_CONFIGS}
    spec = _ray_cluster(kuberay)["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images |= {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert len(images) == 1
    version = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", images.pop())
    assert version and spec["rayVersion"] == version.group(1)


# --- README -------------------------------------------------------------------------------------------------


def test_readme_cluster_section_matches_the_files_and_the_cli():
    import typer.main

    from raybone.cli import app

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for path in set(re.findall(r"cluster/[\w.-]+\.yaml", section)):
        assert (ROOT / path).exists(), path
    search = typer.main.get_command(app).commands["search"]
    options = {opt for param in search.params for opt in param.opts}
    commands = re.findall(r"raybone search ((?:\\\n|[^\n])*)", section)  # with continuation lines
    assert commands
    for command in commands:
        for flag in re.findall(r"(?<!\S)(--[\w-]+)", command):
            assert flag in options, flag
    assert "--results-dir /mnt/shared/results" in section
