import json
import socket
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import ray
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# Real RSNA radiographs live beside the checkout, never inside it (see ../shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
QUICK = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"
# A real search in seconds: 40 px images, 32 px crops, 4 iterations of 8, two trials.
TINY = [
    "data.image_size=40",
    "input_size=32",
    "batch_size=8",
    "iterations=4",
    "eval_every=2",
    "scheduler.grace_period=2",
    "num_samples=2",
]
# The session's shared experiment (conftest's watched search): four full-budget TINY trials, with the loggers
# installed here.
LOGGERS = [name for name in ("mlflow", "wandb") if find_spec(name)]
TINY_SEARCH = [*TINY, "num_samples=4", "scheduler.type=none", f"loggers=[{', '.join(LOGGERS)}]"]


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Prepared data and the demo atlas in the session's own folder, never in the user's ~/.cache/raybone:
    tests neither leave files there nor read what another raybone version prepared."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RAYBONE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def free_port() -> int:
    """A port nothing listens on now (8265, Ray's dashboard default, may be another Ray's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalCluster:
    """A real local Ray cluster with the dashboard (Train-in-Tune needs it to release placement groups)."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        from raybone.tuning.cluster import start_local_ray

        if ray.is_initialized():
            ray.shutdown()
        self.dashboard_url = start_local_ray(num_cpus=2).dashboard_url


@pytest.fixture(scope="module")
def local_ray():
    """One cluster per module, shared by its tests."""
    yield LocalCluster()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _fresh_cluster_after_leaked_placement_groups(request):
    """A placement group left behind by a test's search would hold the module's cluster for the tests after it (CI
    once saw two, after the ASHA test: the next three tests hung for 20 minutes each; their cause, Train restarting
    the workers of a run Tune had stopped, is fixed, see WORKER_RESTARTS in raybone/tuning/trial.py; this stays as a
    safety net). A test that leaves any is followed by a fresh cluster. A `raybone search` is a process of its own,
    so a user never inherits one."""
    yield
    if "local_ray" in request.fixturenames and ray.is_initialized() and placement_groups_left():
        request.getfixturevalue("local_ray").restart()


def placement_groups_left(grace_s: float = 30) -> list[dict]:
    """Placement groups not removed within `grace_s` (Train's cleaner releases a finished run's in seconds)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on a local cluster reports what held the cluster then: a hung search says which placement
    groups and actors kept its trials from starting (CI saw one once, and its traceback showed only a wait)."""
    report = yield
    cluster = getattr(item, "funcargs", {}).get("local_ray")
    if report.when == "call" and report.failed and cluster is not None and ray.is_initialized():
        report.sections.append(("Ray cluster when the test failed", _cluster_state(cluster.dashboard_url)))
    return report


def _cluster_state(dashboard_url: str) -> str:
    from ray.util.state import list_actors

    try:
        groups = [
            f"placement group {key[:12]} {group['state']} {list(group['bundles'].values())}"
            for key, group in ray.util.placement_group_table().items()
            if group["state"] != "REMOVED"
        ]
        actors = [
            f"actor {actor.class_name} {actor.state} pid {actor.pid} placement group {actor.placement_group_id}"
            for actor in list_actors(address=f"http://{dashboard_url}", filters=[("state", "!=", "DEAD")], limit=500)
        ]
    except Exception as err:  # the test's own failure matters more than this report of it
        return f"cluster state unavailable: {err!r}"
    return "\n".join([f"available {ray.available_resources()}", *groups, *actors])


class WatchedSearch(NamedTuple):
    results: Path  # the results folder, holding only this experiment
    path: Path  # results / name
    workdir: Path  # the folder the search ran in: MLflow's ./mlruns
    mlflow_db: Path
    wandb_dir: Path
    seen: list  # what `raybone results` showed while the search ran: (statuses of the trials, reports in history)
    outcome: object = None  # run_search's SearchOutcome


WATCHED = "tiny"


@pytest.fixture(scope="session")
def watched_search(tmp_path_factory):
    """The session's one shared experiment, tiny: a TINY search of four full-budget trials, logged to MLflow and W&B
    (offline) where they are installed, and read by `raybone results` in a second process, as a user's second
    terminal, while it runs. The modules that only read an experiment share it (each trial costs about 20
    CPU-seconds of Ray's start-up); a test that changes it works on a copy."""
    from raybone.spec import load_spec
    from raybone.tuning.cluster import start_local_ray
    from raybone.tuning.run import run_search

    root = tmp_path_factory.mktemp("watched")
    results, workdir = root / "results", root / "workdir"
    workdir.mkdir()
    spec = load_spec(QUICK, TINY_SEARCH)
    watched = WatchedSearch(results, results / WATCHED, workdir, root / "mlflow.db", root, [])
    own_ray = not ray.is_initialized()  # a module's local_ray may already be up
    if own_ray:
        start_local_ray(num_cpus=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # MLflow keeps a database store's artifacts under ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{watched.mlflow_db}")
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(watched.wandb_dir))
        outcome = {}

        def search_in_background():
            try:
                outcome["run"] = run_search(spec, name=WATCHED, results_dir=results)
            except BaseException as err:  # raised below, in the test that asked for the search
                outcome["error"] = err

        search = threading.Thread(target=search_in_background, daemon=True)
        search.start()
        try:
            deadline = time.monotonic() + 600
            while search.is_alive() and time.monotonic() < deadline:
                if len({reports for statuses, reports in watched.seen if "running" in statuses}) < 2:
                    _watch(watched)  # each look starts a process: none once the tables were seen to grow
                time.sleep(1)
            search.join(timeout=60)
        finally:
            if own_ray:
                ray.shutdown()
    assert not search.is_alive(), "the shared search did not end within 10 minutes"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["run"].best is not None, outcome["run"].trials[["trial_id", "status", "error"]].to_string()
    return watched._replace(outcome=outcome["run"])


def _watch(watched: WatchedSearch) -> None:
    """What `raybone results` in its own process shows now (in-process, the search's progress bar would print
    into it)."""
    if not (watched.path / "trials.parquet").is_file():
        return
    command = [sys.executable, "-m", "raybone", "results", WATCHED, "--results-dir", str(watched.results)]
    shown = subprocess.run([*command, "--format", "json"], capture_output=True, text=True)
    if shown.returncode == 0:
        history = pd.read_parquet(watched.path / "history.parquet")
        watched.seen.append(({row["status"] for row in json.loads(shown.stdout)}, len(history)))


@pytest.fixture(scope="session")
def tiny_experiment(watched_search):
    """(results folder, SearchOutcome) of the shared experiment."""
    return watched_search.results, watched_search.outcome


@pytest.fixture(scope="session")
def tiny_model(tiny_experiment, tmp_path_factory):
    """The tiny experiment's best trial, exported as a model folder."""
    from raybone.experiments import Experiment
    from raybone.modelfolder.export import export_model

    results, _ = tiny_experiment
    return export_model(Experiment.open(results, "tiny").best(), tmp_path_factory.mktemp("export") / "model")


def chosen_row(results, name: str = WATCHED):
    """The exported checkpoint as one row: the best trial's trials.parquet row with the metrics, iteration and
    checkpoint of the report `raybone best` chose."""
    from raybone.experiments import Experiment

    best = Experiment.open(results, name).best()
    row = best.row.copy()
    for key, value in best.metrics().items():
        row[key] = value
    row["iteration"], row["checkpoint_path"] = best.iteration, str(best.checkpoint_dir())
    return row


def write_dicom(
    path,
    pixels,
    photometric="MONOCHROME2",
    bits_stored=12,
    rescale=None,
    window=None,
    syntax=ExplicitVRLittleEndian,
    pixel_data=None,
):
    """A real DICOM file written with pydicom; pixels [rows, cols] or [frames, rows, cols]; pixel_data: None (the
    pixels), raw bytes, or "none" (header only)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data is None:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    elif pixel_data != "none":
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
