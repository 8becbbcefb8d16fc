"""Where results go: a local folder or a URI, every read and write through pyarrow.fs (fast, no Ray).

A file:// URI takes the same code path as s3:// and gs:// (pyarrow.fs.FileSystem.from_uri), so the tables
written and read back through one here exercise what a search on a bucket does.
"""

import os
from pathlib import Path

import pandas as pd
import pytest

from raybone.errors import RayboneError
from raybone.experiments import Experiment, list_experiments
from raybone.experiments import storage as results
from raybone.tuning.cluster import check_storage_reaches_nodes


def _trials(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(n)],
            "status": ["completed"] * n,
            "val_rmse": [1.0 + i for i in range(n)],
            "node": ["a"] * n,
        }
    )


def test_tables_round_trip_through_a_file_uri(tmp_path):
    storage = f"file://{tmp_path}/shared"
    for name, n in (("first", 2), ("second", 3)):
        experiment = results.join(storage, name)
        assert experiment == f"file://{tmp_path}/shared/{name}"
        results.write_parquet(_trials(n), results.join(experiment, results.TRIALS))
        results.write_json({"seed": 0}, results.join(experiment, "environment.json"))
    # The files are where a local reader expects them, with no temporary table left behind.
    assert sorted(p.name for p in (tmp_path / "shared" / "second").iterdir()) == ["environment.json", "trials.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "shared" / "second" / "trials.parquet"), _trials(3))
    # ...and the readers the other commands use accept the URI.
    assert list_experiments(storage) == ["first", "second"]
    assert Experiment.open(storage, "second").location == f"file://{tmp_path}/shared/second"
    pd.testing.assert_frame_equal(Experiment.open(storage, "second").trials(), _trials(3))
    assert Experiment.open(storage, "first").environment == {"seed": 0}
    with pytest.raises(RayboneError, match=r"no experiment named 'third' in file://.*\(known: first, second\)"):
        Experiment.open(storage, "third")


def test_local_folders_keep_returning_paths(tmp_path):
    results.write_parquet(_trials(1), tmp_path / "exp" / results.TRIALS)
    assert Experiment.open(tmp_path, "exp").location == tmp_path / "exp"
    assert list_experiments(tmp_path) == ["exp"] and list_experiments(tmp_path / "none") == []
    assert len(Experiment.open(str(tmp_path), "exp").trials()) == 1
    assert results.study_dir(tmp_path, "exp") == tmp_path / "exp"


def test_a_failed_write_leaves_the_previous_table(tmp_path):
    target = f"file://{tmp_path}/exp/trials.parquet"
    results.write_parquet(_trials(2), target)
    with pytest.raises(ValueError):
        results.write_parquet(pd.DataFrame({"bad": [object()]}), target)  # not serialisable
    pd.testing.assert_frame_equal(results.read_parquet(target), _trials(2))
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["trials.parquet"]


def test_uris_keep_their_scheme_and_query(tmp_path):
    assert results.join("s3://bucket/prefix/", "exp", "train") == "s3://bucket/prefix/exp/train"
    assert (
        results.join("s3://bucket/p?endpoint_override=localhost:9000", "exp")
        == "s3://bucket/p/exp?endpoint_override=localhost:9000"
    )
    # A URI that went through pathlib (an option typed Path) has lost a slash: it gets it back.
    assert results.location_text(Path("s3://bucket/prefix")) == "s3://bucket/prefix"
    assert results.location_text("s3://bucket/prefix") == "s3://bucket/prefix"
    assert results.is_local(Path("file:///mnt/x")) and results.is_local("results") and not results.is_local("gs://b")
    assert not results.is_uri("C:/results") and results.is_uri(f"file://{tmp_path}")
    # Ray reports checkpoint paths inside the storage's filesystem, without its scheme.
    assert (
        results.as_location(f"{tmp_path}/exp/train/ckpt", f"file://{tmp_path}") == f"file://{tmp_path}/exp/train/ckpt"
    )
    assert results.as_location("/elsewhere/ckpt", f"file://{tmp_path}") == "/elsewhere/ckpt"
    assert results.as_location(f"{tmp_path}/ckpt", tmp_path) == f"{tmp_path}/ckpt"


def test_a_uri_keeps_its_optuna_study_in_the_local_results_folder(tmp_path):
    assert results.study_dir("s3://bucket/prefix", "exp") == (Path("results") / "exp").absolute()
    assert results.study_dir(f"file://{tmp_path}", "exp") == (Path("results") / "exp").absolute()


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(RayboneError, match="cannot open storage nope://bucket/x"):
        results.exists("nope://bucket/x")


def test_a_local_folder_is_refused_where_other_nodes_train(tmp_path):
    refused = (
        f"this cluster has 3 nodes but results go to the local folder {tmp_path}, which the other nodes "
        "cannot reach; pass --storage s3://... or an NFS path with --shared-storage"
    )
    for local in (tmp_path, f"file://{tmp_path}"):
        with pytest.raises(RayboneError) as err:
            check_storage_reaches_nodes(local, shared=False, nodes=3, trial_fits_now=True)
        assert str(err.value) == refused
        with pytest.raises(RayboneError, match="trials will train on nodes the autoscaler adds"):
            check_storage_reaches_nodes(local, shared=False, nodes=1, trial_fits_now=False)
        check_storage_reaches_nodes(local, shared=True, nodes=3, trial_fits_now=False)  # NFS, as asserted
        check_storage_reaches_nodes(local, shared=False, nodes=1, trial_fits_now=True)  # one machine
    check_storage_reaches_nodes("s3://bucket/prefix", shared=False, nodes=3, trial_fits_now=False)
    check_storage_reaches_nodes("gs://bucket/prefix", shared=False, nodes=3, trial_fits_now=False)


def test_the_cli_resumes_from_a_uri_storage_or_says_what_is_missing(tmp_path):
    from typer.testing import CliRunner

    from raybone.cli import app

    result = CliRunner().invoke(app, ["search", "--resume", "gone", "--storage", f"file://{tmp_path}/store"])
    assert result.exit_code == 2
    assert f"cannot resume 'gone': no raybone experiment at file://{tmp_path}/store/gone" in result.output


def test_mirror_copies_a_uri_folder_once_and_refreshes_what_changed(tmp_path):
    remote = tmp_path / "bucket" / "exp"
    (remote / "train" / "trial-1").mkdir(parents=True)
    (remote / "trials.parquet").write_bytes(b"table v1")
    (remote / "train" / "trial-1" / "checkpoint.pt").write_bytes(b"weights")
    local = tmp_path / "mirror"

    top = results.mirror(f"file://{remote}", local, recursive=False)
    assert (top / "trials.parquet").read_bytes() == b"table v1"
    assert not (top / "train").exists()  # the folder's own files only

    results.mirror(f"file://{remote}", local)
    assert (local / "train" / "trial-1" / "checkpoint.pt").read_bytes() == b"weights"
    (local / "train" / "trial-1" / "checkpoint.pt").write_bytes(b"touched")  # same size and time: not fetched again
    stamp = (remote / "train" / "trial-1" / "checkpoint.pt").stat().st_mtime_ns
    os.utime(local / "train" / "trial-1" / "checkpoint.pt", ns=(stamp, stamp))
    (remote / "trials.parquet").write_bytes(b"table v2, longer")
    results.mirror(f"file://{remote}", local)
    assert (local / "trials.parquet").read_bytes() == b"table v2, longer"
    assert (local / "train" / "trial-1" / "checkpoint.pt").read_bytes() == b"touched"
    assert not list(local.rglob("*.part"))

    with pytest.raises(RayboneError, match=r"file://.*/nowhere: no such folder"):
        results.mirror(f"file://{tmp_path}/nowhere", local)


def test_the_history_names_restored_checkpoints_as_uris_like_its_own(tmp_path):
    """A PBT trial's restored_from is the donor's checkpoint_path, also on a URI storage (Ray reports both without the
    scheme), so the two join."""
    from types import SimpleNamespace

    from raybone.tuning.tables import history_table

    train = tmp_path / "shared" / "pbt" / "train"
    reports = pd.DataFrame(
        {
            "trial_id": ["a", "b"],
            "iteration": [4, 6],
            "timestamp": [1, 2],
            "resumed_from": [0, 4],
            "restored_from": [None, f"{train}/trial-a/checkpoint_0"],
            "checkpoint_path": [f"{train}/trial-a/checkpoint_0", f"{train}/trial-b-1a2b3c/checkpoint_0"],
        }
    )
    history = history_table([SimpleNamespace(metrics_dataframe=reports)], f"file://{tmp_path}/shared")
    donor, exploiter = history.itertuples()
    assert exploiter.restored_from == donor.checkpoint_path == f"file://{train}/trial-a/checkpoint_0"
    assert pd.isna(donor.restored_from)


def test_a_pbt_run_starts_from_its_donors_checkpoint_as_a_location_with_its_scheme(tmp_path):
    """Ray reports a checkpoint's path without the scheme; a run that exploits it opens it without being told the
    filesystem, and a schemeless path in a bucket is no local path (every PBT exploit on s3:// failed)."""
    import ray.train

    from raybone.tuning.trial import donor_start

    train = tmp_path / "shared" / "pbt" / "train"
    (train / "trial-a" / "checkpoint_0").mkdir(parents=True)
    (train / "trial-a" / "checkpoint_0" / "checkpoint.pt").write_bytes(b"weights")
    donor = {"path": str(train / "trial-a" / "checkpoint_0"), "trial_id": "a"}

    start = donor_start(donor, f"file://{train}")
    assert start == {"path": f"file://{train}/trial-a/checkpoint_0", "trial_id": "a"}
    with ray.train.Checkpoint(start["path"]).as_directory() as folder:
        assert (Path(folder) / "checkpoint.pt").read_bytes() == b"weights"
    assert donor_start(donor, str(train)) == donor  # a local folder: the path as it is
