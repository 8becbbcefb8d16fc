"""`raybone results` on a real search: ranked trials, the Optuna study, hyperparameter importances."""

import io
import json
import math
import re

import optuna
import pandas as pd
import pytest
from conftest import QUICK, TINY, WATCHED
from rich.console import Console
from typer.testing import CliRunner

from raybone.cli import app
from raybone.experiments import Experiment, importances
from raybone.spec import load_spec

SEARCHED = ("lr", "decay_steps", "l2_weight", "weight_decay")
NAME = WATCHED

runner = CliRunner()


@pytest.fixture(scope="module")
def experiment(watched_search):
    """Four full-budget trials (conftest's watched search, which other modules read too)."""
    return watched_search.results, watched_search.path


def _results(results_dir, *args):
    return runner.invoke(app, ["results", *args, "--results-dir", str(results_dir)])


def test_the_optuna_study_holds_every_trial_with_its_best_metric(experiment):
    _, path = experiment
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{path / 'optuna.db'}")
    assert len(study.trials) == 4
    trials = pd.read_parquet(path / "trials.parquet").set_index("trial_index")
    for t in study.trials:  # every trial trained for the whole budget: COMPLETE, valued at its best report
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert set(SEARCHED) <= set(t.params)
        assert t.value == pytest.approx(trials.loc[t.number, "best_val_rmse"])
        assert t.params["lr"] == pytest.approx(trials.loc[t.number, "lr"])
        assert t.user_attrs["ray_trial_id"] == trials.loc[t.number, "trial_id"]


def test_json_lists_every_trial_once_best_first(experiment):
    results, path = experiment
    result = _results(results, NAME, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    ids = [r["trial_id"] for r in rows]
    assert sorted(ids) == sorted(pd.read_parquet(path / "trials.parquet").trial_id) and len(set(ids)) == 4
    rmse = [r["best_val_rmse"] for r in rows]
    assert rmse == sorted(rmse) and [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(set(SEARCHED) <= set(r) for r in rows)

    top = json.loads(_results(results, NAME, "--format", "json", "--top", "2").stdout)
    assert [r["trial_id"] for r in top] == ids[:2]


def test_csv_parses_and_the_name_defaults_to_the_latest(experiment):
    results, _ = experiment
    result = _results(results, "--format", "csv")  # no NAME: the most recent experiment
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert len(table) == 4 and table.best_val_rmse.is_monotonic_increasing
    assert {"trial_id", "status", *SEARCHED, "iteration", "wall_time_s"} <= set(table.columns)
    ranked = Experiment.open(results, NAME).ranked()
    assert table.equals(pd.read_csv(io.StringIO(ranked.to_csv(index=False))))


def test_table_shows_trials_and_importances_of_the_four_hyperparameters(experiment):
    results, path = experiment
    result = _results(results, NAME)
    assert result.exit_code == 0, result.output
    assert "hyperparameter importances (fanova, 4 completed trials (stopped early left out) from optuna.db)" in (
        result.output
    )
    section = result.output[result.output.index("hyperparameter importances") :]
    shown = {name: float(re.search(rf"\b{name}\b\W+([01]\.\d{{3}})", section).group(1)) for name in SEARCHED}
    assert sum(shown.values()) == pytest.approx(1, abs=0.01)
    computed = importances(Experiment.open(results, NAME))
    assert computed.source == "optuna.db" and set(computed.values) == set(SEARCHED)
    assert math.isclose(sum(computed.values.values()), 1) and all(v >= 0 for v in computed.values.values())
    for trial_id in pd.read_parquet(path / "trials.parquet").trial_id:
        assert trial_id in result.output


def test_importances_from_trials_parquet_when_the_study_is_gone(experiment, tmp_path):
    import shutil

    _, path = experiment
    copy = tmp_path / NAME
    copy.mkdir()
    for name in ("trials.parquet", "spec.yaml"):
        shutil.copy(path / name, copy / name)
    fallback = importances(Experiment.open(tmp_path, NAME), "ped")
    assert fallback.source.startswith("trials.parquet") and fallback.trials == 4
    assert set(fallback.values) == set(SEARCHED) and math.isclose(sum(fallback.values.values()), 1)
    assert set(importances(Experiment.open(tmp_path, NAME), "mdi").values) == set(SEARCHED)


def test_importances_leave_out_the_trials_a_warm_start_put_in_the_study(experiment, tmp_path):
    """They counted the earlier experiment's trials: '2 completed trials' beside a table of 1."""
    import shutil

    _, path = experiment
    copy = shutil.copytree(path, tmp_path / NAME)
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{copy / 'optuna.db'}")
    earlier = study.trials[0]
    for n in range(3):  # as OptunaSearcher adds a warm start's trials, under the earlier experiment's ids
        study.add_trial(
            optuna.trial.create_trial(
                params=earlier.params,
                distributions=earlier.distributions,
                value=earlier.value + n + 1,
                user_attrs={"ray_trial_id": f"earlier{n}"},
            )
        )
    counted = importances(Experiment.open(tmp_path, NAME))
    assert counted.source == "optuna.db" and counted.trials == 4


def test_a_warm_start_says_what_the_earlier_search_trained_otherwise(experiment):
    from raybone.tuning.searcher import warm_start_trials

    results, _ = experiment
    output = Console(file=io.StringIO(), width=1000)
    other = load_spec(QUICK, TINY + ["num_samples=2", "iterations=8", "data.image_size=48", "lr.high=1e-2", "seed=3"])
    assert len(warm_start_trials(results, NAME, other, output)) == 4
    said = output.file.getvalue()
    assert (
        f"note: {NAME} trained its trials otherwise (data.image_size: 40 -> 48; seed: 0 -> 3; train.iterations: 4 -> 8)"
        in said
    )
    output = Console(file=io.StringIO(), width=1000)
    warm_start_trials(results, NAME, load_spec(QUICK, TINY + ["num_samples=3", "lr.high=1e-2"]), output)
    assert "note:" not in output.file.getvalue()  # more trials, a wider range: the same training


def test_list_shows_the_experiment(experiment):
    results, _ = experiment
    result = _results(results, "--list")
    assert result.exit_code == 0, result.output
    assert NAME in result.output and "val_rmse" in result.output
    (row,) = json.loads(_results(results, "--list", "--format", "json").stdout)
    best = pd.read_parquet(experiment[1] / "trials.parquet").best_val_rmse.min()
    assert row["name"] == NAME and row["trials"] == 4 and row["best"] == pytest.approx(best)


def test_unknown_experiment_is_one_line_and_exit_2(experiment):
    results, _ = experiment
    result = _results(results, "nope")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'nope'" in lines[0] and NAME in lines[0] and "Traceback" not in result.output


def _fake_experiment(folder, rows) -> Experiment:
    """An experiment folder with the quick spec and hand-written trials (no Ray), as raybone before 0.2 wrote them:
    `training_iteration` for `iteration`."""
    import yaml

    folder.mkdir(parents=True)
    spec = load_spec(QUICK)
    (folder / "spec.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
    base = {
        "status": "completed",
        "lr": 1e-3,
        "decay_steps": 60,
        "l2_weight": 0.1,
        "weight_decay": 0.01,
        "training_iteration": 120,
        "wall_time_s": 1.0,
    }
    frame = pd.DataFrame([{**base, "trial_id": f"t{i}", "trial_index": i, **row} for i, row in enumerate(rows)])
    frame.to_parquet(folder / "trials.parquet", index=False)
    return Experiment.open(folder.parent, folder.name)


def test_importances_explain_why_they_are_missing(tmp_path):
    one = importances(
        _fake_experiment(
            tmp_path / "one",
            [
                {"val_rmse": 2.0},
                {"val_rmse": None, "status": "error"},
                {"val_rmse": 1.5, "lr": 5e-4, "status": "stopped_early"},
            ],
        )
    )
    # The early-stopped trial trained for fewer iterations: it is not compared with the completed one.
    assert one.values == {} and "at least 2 completed trials" in one.note and "has 1" in one.note
    same = importances(_fake_experiment(tmp_path / "same", [{"val_rmse": 2.0}, {"val_rmse": 3.0}]))
    assert same.values == {} and "never varied" in same.note
    partly = importances(
        _fake_experiment(
            tmp_path / "partly", [{"val_rmse": v, "lr": lr} for v, lr in ((2.0, 1e-3), (3.0, 2e-3), (2.5, 5e-4))]
        ),
        "ped",
    )
    assert set(partly.values) == {"lr"} and partly.constant == ["decay_steps", "l2_weight", "weight_decay"]
    result = _results(tmp_path, "partly")
    assert (
        result.exit_code == 0 and "never varied" in result.output and "trials.parquet (no optuna.db)" in result.output
    )


def test_ranking_follows_the_mode_and_puts_failed_trials_last(tmp_path):
    experiment = _fake_experiment(
        tmp_path / "max", [{"val_rmse": 2.0}, {"val_rmse": None, "status": "error"}, {"val_rmse": 3.0}]
    )
    assert list(experiment.ranked().trial_id) == ["t0", "t2", "t1"]
    assert (experiment.trials().iteration == 120).all()  # an older table's training_iteration, read as iteration
    folder = experiment.location
    spec = (
        (folder / "spec.yaml")
        .read_text()
        .replace("metric: val_rmse", "metric: val_top1")
        .replace("mode: min", "mode: max")
    )
    (folder / "spec.yaml").write_text(spec)
    trials = pd.read_parquet(folder / "trials.parquet").assign(val_top1=[0.2, None, 0.5])
    trials.to_parquet(folder / "trials.parquet", index=False)
    assert list(Experiment.open(tmp_path, "max").ranked().trial_id) == ["t2", "t0", "t1"]
