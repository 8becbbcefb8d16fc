"""The Ray cluster a search runs on: a fresh local one by default, or an existing one; what it can hold; whether
its nodes reach the results' storage."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import ray
from filelock import FileLock
from rich.console import Console

from raybone.errors import RayboneError, SpecError
from raybone.experiments import storage as results
from raybone.spec import Spec

DASHBOARD_PORT = 8265
# Filesystems every node of a cluster can mount: a results folder on one of them is shared.
NETWORK_FILESYSTEMS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "gpfs",
    "ceph",
    "glusterfs",
    "fuse.glusterfs",
    "beegfs",
    "fuse.gcsfuse",
    "fuse.juicefs",
}


def trials_that_fit(spec: Spec, cluster: dict) -> int:
    """How many trials the cluster's present CPUs and GPUs can train at once."""
    r = spec.resources
    need = {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}
    return min(math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)


def concurrent_trials(spec: Spec, cluster: dict) -> int:
    """How many trials train at once: resources.max_concurrent_trials where set (an autoscaling cluster: trials
    wait for the nodes it adds), else as many as the present cluster fits (more drivers would only wait)."""
    r = spec.resources
    if r.max_concurrent_trials is not None:
        return min(r.max_concurrent_trials, spec.num_samples)
    fits = trials_that_fit(spec, cluster)
    if fits < 1:
        raise SpecError(
            f"one trial needs {r.num_workers * r.cpus_per_worker:g} CPUs and "
            f"{r.num_workers * r.gpus_per_worker:g} GPUs but the cluster has {cluster.get('CPU', 0):g} CPUs "
            f"and {cluster.get('GPU', 0):g} GPUs; lower resources.num_workers / cpus_per_worker / "
            "gpus_per_worker, or on an autoscaling cluster set resources.max_concurrent_trials "
            "so that trials wait for the nodes it adds"
        )
    return min(fits, spec.num_samples)


def check_storage_reaches_nodes(location: str | Path, *, shared: bool, nodes: int, trial_fits_now: bool) -> None:
    """Refuse a results folder on this machine's disk when Train workers on other nodes would write to it.

    A URI other than file:// (s3://, gs://) is reachable from every node; a local folder is when the caller
    says so (--shared-storage) or when it lies on a network filesystem (NFS, Lustre, ...).
    """
    if shared or not results.is_local(location):
        return
    folder = results.storage(location)[1]
    if _filesystem_type(folder) in NETWORK_FILESYSTEMS:
        return
    hint = "pass --storage s3://... or an NFS path with --shared-storage"
    if nodes > 1:
        raise RayboneError(
            f"this cluster has {nodes} nodes but results go to the local folder {folder}, "
            f"which the other nodes cannot reach; {hint}"
        )
    if not trial_fits_now:
        raise RayboneError(
            f"trials will train on nodes the autoscaler adds (no node has room for one now) but "
            f"results go to the local folder {folder}, which those nodes cannot reach; {hint}"
        )


def resource_nodes() -> int:
    """Alive nodes that offer resources (a dead or draining node's entry stays in ray.nodes())."""
    return sum(
        1 for node in ray.nodes() if node.get("Alive") and any(v > 0 for v in node.get("Resources", {}).values())
    )


def _filesystem_type(folder: str) -> str | None:
    """The type of the filesystem (from /proc/self/mountinfo) that holds `folder`, if known."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = os.path.realpath(folder), "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].encode().decode("unicode_escape")  # spaces come as \040
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


def start_ray(address: str | None, console: Console) -> None:
    if ray.is_initialized():
        return
    context = start_local_ray() if address is None else ray.init(address=address)
    if context.dashboard_url:
        console.print(f"Ray dashboard: http://{context.dashboard_url}")


def start_local_ray(num_cpus: int | None = None):
    """A fresh in-process cluster ("local"), even if `ray start` left one running on this machine.

    Its workers are told their dashboard: with two Ray instances on one machine, Train's placement-group
    cleaner cannot tell which is theirs, and finished trials would keep their CPUs (later trials hang).
    Searches started at the same moment take turns: both saw the dashboard port free, and the second one's Ray
    failed to start with a traceback once the first had bound it.
    """
    # A lock per user id: another user's lock file in /tmp could not be opened. (Not the user name: a container's
    # user id may have none. Windows has no user ids, and gives each user a temporary folder of their own.)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    with FileLock(Path(tempfile.gettempdir()) / f"raybone-ray-start-{uid}.lock"):
        port = _free_port(DASHBOARD_PORT)
        return ray.init(
            address="local",
            num_cpus=num_cpus,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            include_dashboard=True,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        )


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RayboneError("no free port for the Ray dashboard")
