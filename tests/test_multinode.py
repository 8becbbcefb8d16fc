"""A real two-node Ray cluster on this machine: trials spread over both nodes, results through a file:// URI
(pyarrow's filesystem, the code path of s3://), a local folder refused, and a node that leaves mid-search."""

import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import free_port
from ray.cluster_utils import Cluster

from raybone.core.checkpoint import read_checkpoint
from raybone.errors import RayboneError
from raybone.spec import load_spec
from raybone.tuning.run import run_search

pytestmark = pytest.mark.slow

QUICK = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"
# One CPU per Train worker and one CPU per node: two trials at once, one on each node.
SMALL = ["data.image_size=40", "input_size=32", "batch_size=8", "scheduler.type=none", "resources.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each; the head runs the dashboard Train-in-Tune needs."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),  # the head takes 8265 or fails
        },
    )
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    # Train's placement-group cleaner asks the state API for "the" cluster: with other Ray instances on this
    # machine (parallel test runs) it must be told which one, or the trials' placement groups leak.
    ray.init(
        address=cluster.address, configure_logging=False, runtime_env={"env_vars": {"RAY_ADDRESS": cluster.address}}
    )
    yield cluster, cluster.head_node.node_id, second
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URI storage keeps its optuna.db in ./results/<name>/
    return tmp_path


def test_a_local_folder_is_refused_on_two_nodes(cluster, in_tmp):
    spec = load_spec(QUICK, SMALL + ["iterations=2", "eval_every=2", "num_samples=2"])
    for storage in (in_tmp / "local", f"file://{in_tmp}/local"):
        with pytest.raises(
            RayboneError,
            match=r"^this cluster has 2 nodes but results go to the local folder "
            rf"{in_tmp}/local, which the other nodes cannot reach; pass "
            r"--storage s3://\.\.\. or an NFS path with --shared-storage$",
        ):
            run_search(spec, name="refused", results_dir=storage)
    assert not any(in_tmp.iterdir()), "a refused search wrote something"


def test_trials_spread_over_both_nodes_into_shared_storage(cluster, in_tmp):
    _, head, second = cluster
    # Two trials start together, and each fills a node's one CPU: the second must train on the other node.
    spec = load_spec(QUICK, SMALL + ["iterations=4", "eval_every=2", "num_samples=2"])
    outcome = run_search(spec, name="spread", results_dir=f"file://{in_tmp}/shared", shared_storage=True)

    assert outcome.path == f"file://{in_tmp}/shared/spread"
    trials = pd.read_parquet(in_tmp / "shared" / "spread" / "trials.parquet")
    assert len(trials) == 2 and trials.trial_id.is_unique
    assert (trials.status == "completed").all() and (trials.iteration == 4).all()
    assert trials.val_rmse.notna().all()
    assert set(trials.node) == {head, second.node_id}
    for checkpoint in trials.checkpoint_path:  # URIs of the storage's scheme, files where they say
        assert checkpoint.startswith(f"file://{in_tmp}/shared/spread/train/trial-")
        assert (Path(checkpoint.removeprefix("file://")) / "checkpoint.pt").is_file()
    assert len(pd.read_parquet(in_tmp / "shared" / "spread" / "history.parquet")) == 2 * 2
    assert (in_tmp / "results" / "spread" / "optuna.db").is_file()  # the study stays local...
    assert (in_tmp / "shared" / "spread" / "optuna.db").is_file()  # ...and a copy joins the tables


def _trained_on(experiment: Path, node_id: str, iterations: int) -> bool:
    """A checkpoint of `iterations` or more trained on `node_id`: its run has registered an earlier one."""
    for path in experiment.glob("train/trial-*/checkpoint_*/checkpoint.pt"):
        try:
            metrics = read_checkpoint(path.parent)["metrics"]
            if metrics["node"] == node_id and metrics["iteration"] >= iterations:
                return True
        except Exception:  # being written right now
            continue
    return False


def test_a_node_that_leaves_mid_search_costs_no_trial(cluster, in_tmp):
    """Issue 6: the second node is killed while a trial trains there; the trial resumes on the head."""
    nodes, head, second = cluster
    spec = load_spec(QUICK, SMALL + ["iterations=120", "eval_every=20", "num_samples=2", "resources.max_failures=2"])
    outcome = {}

    def search_in_background():
        try:
            outcome["run"] = run_search(spec, name="leave", results_dir=f"file://{in_tmp}/shared", shared_storage=True)
        except BaseException as err:  # shown by the assertion below
            outcome["error"] = err

    search = threading.Thread(target=search_in_background)
    search.start()
    deadline = time.time() + 120
    while not _trained_on(in_tmp / "shared" / "leave", second.node_id, iterations=40):
        assert search.is_alive() and time.time() < deadline, "no checkpoint from the second node"
        time.sleep(0.2)
    nodes.remove_node(second, allow_graceful=False)
    search.join(timeout=300)
    assert not search.is_alive(), "the search did not finish after the node left"
    assert "error" not in outcome, outcome.get("error")

    trials = outcome["run"].trials
    assert len(trials) == 2 and (trials.status == "completed").all() and (trials.iteration == 120).all()
    assert (trials.node == head).all()  # the last report of every trial came from the head
    history = pd.read_parquet(in_tmp / "shared" / "leave" / "history.parquet")
    moved = history[history.trial_id.isin(history[history.node == second.node_id].trial_id)]
    resumed = moved[moved.resumed_from > 0]
    assert len(resumed) and (resumed.node == head).all(), "no trial resumed from its checkpoint on the head"
    assert resumed.resumed_from.min() >= 20
    for _, rows in history.groupby("trial_id"):
        assert rows.iteration.max() == 120
