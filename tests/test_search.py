"""A real search on a real local Ray cluster: Tune + Optuna + ASHA driving Ray Train runs."""

import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import QUICK, TINY

from raybone.errors import SpecError
from raybone.spec import load_spec
from raybone.tuning.cluster import concurrent_trials
from raybone.tuning.run import run_search
from raybone.tuning.trial import trial_seed


@pytest.fixture(scope="module")
def tiny_search(tiny_experiment):
    return load_spec(QUICK, TINY), tiny_experiment[1]


def test_search_writes_one_row_per_trial(tiny_search):
    spec, outcome = tiny_search
    trials = pd.read_parquet(outcome.path / "trials.parquet")
    assert len(trials) == 2 and trials.trial_id.is_unique
    assert sorted(trials.trial_index) == [0, 1]
    for name in ("lr", "decay_steps", "l2_weight", "weight_decay"):
        low, high = spec.train[name].low, spec.train[name].high
        assert trials[name].between(low, high).all(), name
    assert set(trials.status) <= {"completed", "stopped_early"}
    assert (trials.iteration >= 2).all() and (trials.iteration <= 4).all()
    assert trials.val_top1.between(0, 1).all() and (trials.val_top2 >= trials.val_top1).all()
    assert (trials.val_rmse >= 0).all() and (trials.wall_time_s > 0).all()
    for checkpoint in trials.checkpoint_path:
        assert (Path(checkpoint) / "checkpoint.pt").is_file()


def test_history_has_one_row_per_report(tiny_search):
    _, outcome = tiny_search
    trials = pd.read_parquet(outcome.path / "trials.parquet")
    history = pd.read_parquet(outcome.path / "history.parquet")
    assert set(history.trial_id) == set(trials.trial_id)
    for trial_id, rows in history.groupby("trial_id"):
        assert list(rows.iteration) == list(range(2, rows.iteration.max() + 1, 2))
        final = trials.set_index("trial_id").loc[trial_id]
        assert rows.val_rmse.iloc[-1] == pytest.approx(final.val_rmse)


def test_search_saves_its_provenance(tiny_search):
    spec, outcome = tiny_search
    assert load_spec(outcome.path / "spec.yaml") == spec
    environment = (outcome.path / "environment.json").read_text()
    assert '"torch"' in environment and "data_fingerprint" in environment
    assert outcome.best is not None and outcome.best.val_rmse == outcome.trials.val_rmse.min()


@pytest.mark.parametrize("folder", ["rsna-full", "rsna-raw"])
def test_search_trains_on_real_radiographs(local_ray, shared_data, tmp_path, monkeypatch, folder):
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))  # never beside the read-only source
    spec = load_spec(QUICK, TINY + [f"data.source={shared_data / folder}", "num_samples=1", "scheduler.type=none"])
    outcome = run_search(spec, name=folder, results_dir=tmp_path / "results")
    (row,) = outcome.trials.itertuples()
    assert row.status == "completed" and row.iteration == 4
    assert 0 <= row.val_top1 <= row.val_top2 <= 1 and row.val_rmse > 0


def test_concurrency_is_bounded_by_the_cluster():
    spec = load_spec(QUICK, ["resources.cpus_per_worker=2"])
    assert concurrent_trials(spec, {"CPU": 8}) == 4
    assert concurrent_trials(spec, {"CPU": 3}) == 1
    gpu = load_spec(QUICK, ["resources.gpus_per_worker=0.25", "resources.cpus_per_worker=1", "num_samples=100"])
    assert concurrent_trials(gpu, {"CPU": 16, "GPU": 2}) == 8
    with pytest.raises(
        SpecError,
        match="one trial needs 2 CPUs and 2 GPUs but the cluster has 2 CPUs and 1 GPUs"
        ".*on an autoscaling cluster set resources.max_concurrent_trials",
    ):
        concurrent_trials(
            load_spec(QUICK, ["resources.gpus_per_worker=1", "resources.num_workers=2", "resources.cpus_per_worker=1"]),
            {"CPU": 2, "GPU": 1},
        )


def test_autoscaling_clusters_set_the_concurrency_and_trials_wait_for_nodes():
    # A fresh autoscaling cluster: a 0-CPU head, no GPU worker yet. The cap is used as given, up to num_samples.
    gpu = ["resources.gpus_per_worker=1", "resources.cpus_per_worker=3", "num_samples=16"]
    assert concurrent_trials(load_spec(QUICK, gpu + ["resources.max_concurrent_trials=4"]), {"CPU": 0}) == 4
    assert concurrent_trials(load_spec(QUICK, gpu + ["resources.max_concurrent_trials=4"]), {"CPU": 64, "GPU": 8}) == 4
    assert concurrent_trials(load_spec(QUICK, gpu + ["resources.max_concurrent_trials=40"]), {}) == 16
    with pytest.raises(SpecError, match="resources.max_concurrent_trials"):
        concurrent_trials(load_spec(QUICK, gpu), {"CPU": 0})
    with pytest.raises(SpecError, match="max_concurrent_trials: Input should be greater than or equal to 1"):
        load_spec(QUICK, ["resources.max_concurrent_trials=0"])


def test_trial_seeds_differ_by_index_and_follow_the_experiment_seed():
    seeds = {trial_seed(0, i) for i in range(50)}
    assert len(seeds) == 50
    assert trial_seed(0, 3) == trial_seed(0, 3) != trial_seed(1, 3)


def _sampled(spec, folder, count):
    from raybone.tuning.searcher import searcher, tune_space

    folder.mkdir()
    search = searcher(spec, folder)
    search.set_search_properties(spec.metric, spec.mode, tune_space(spec))
    return [search.suggest(f"t{i}") for i in range(count)]


def test_one_seed_gives_one_sequence_of_sampled_configs(tmp_path):
    spec = load_spec(QUICK)
    first, again = _sampled(spec, tmp_path / "a", 5), _sampled(spec, tmp_path / "b", 5)
    other = _sampled(load_spec(QUICK, ["seed=1"]), tmp_path / "c", 5)
    assert first == again
    assert [c["trial_index"] for c in first] == [0, 1, 2, 3, 4]
    assert [c["lr"] for c in first] != [c["lr"] for c in other]


@pytest.mark.parametrize("samples, models_third_trial", [(6, True), (30, False)])
def test_tpe_models_results_after_a_third_of_a_small_search(tmp_path, samples, models_third_trial):
    """Optuna's 10 random start-up trials would make a search of 10 trials or fewer plain random search."""
    from raybone.tuning.searcher import searcher, tune_space

    spec = load_spec(QUICK, [f"num_samples={samples}"])
    thirds = []
    for name, values in (("a", (1.0, 5.0)), ("b", (5.0, 1.0))):  # the same two trials, opposite results
        (tmp_path / name).mkdir()
        search = searcher(spec, tmp_path / name)
        search.set_search_properties(spec.metric, spec.mode, tune_space(spec))
        for i, value in enumerate(values):
            search.suggest(f"t{i}")
            search.on_trial_complete(f"t{i}", {spec.metric: value, "training_iteration": 1})
        thirds.append(search.suggest("t2"))
    assert (thirds[0] != thirds[1]) == models_third_trial


RECIPES = (
    "start_from=[{lr: 1.0e-4, decay_steps: 100, l2_weight: 1.0, weight_decay: 0.1}, "
    "{lr: 3.0e-3, decay_steps: 30, l2_weight: 1.0e-3, weight_decay: 1.0e-4}]"
)


def test_a_search_starts_from_the_given_configurations_once(tmp_path):
    from raybone.tuning.searcher import searcher, tune_space

    spec = load_spec(QUICK, [RECIPES])
    first = searcher(spec, tmp_path)
    first.set_search_properties(spec.metric, spec.mode, tune_space(spec))
    assert first.suggest("t0") == {**spec.start_from[0], "trial_index": 0}
    # Resumed (a new searcher on the same study): the second recipe is still due, the first is not run again.
    again = searcher(spec, tmp_path)
    again.set_search_properties(spec.metric, spec.mode, tune_space(spec))
    assert again.suggest("t1") == {**spec.start_from[1], "trial_index": 1}
    sampled = again.suggest("t2")
    assert sampled["trial_index"] == 2 and {k: sampled[k] for k in spec.searched()} not in spec.start_from


@pytest.mark.parametrize(
    "point, message",
    [
        (
            "{lr: 1.0e-4}",
            "start_from.0: name every searched hyperparameter; missing decay_steps, l2_weight, weight_decay",
        ),
        (
            "{lr: 1.0e-2, decay_steps: 100, l2_weight: 1.0, weight_decay: 0.1}",
            "start_from.0.lr: 0.01 is outside the searched range [0.0001, 0.003]",
        ),
        (
            "{lr: 1.0e-4, decay_steps: 100, l2_weight: 1.0, weight_decay: 0.1, batch_size: 8}",
            "start_from.0: batch_size not searched",
        ),
    ],
)
def test_a_start_point_outside_the_search_is_refused_before_ray_starts(point, message):
    with pytest.raises(SpecError, match=rf"quick.yaml: {re.escape(message)}"):
        load_spec(QUICK, [f"start_from=[{point}]"])


def test_a_spec_that_searches_nothing_repeats_its_fixed_configuration(tmp_path):
    fixed = ["lr=1.0e-3", "decay_steps=100", "l2_weight=0.1", "weight_decay=0.01"]
    from raybone.tuning.searcher import searcher

    spec = load_spec(QUICK, fixed)
    (tmp_path / "fixed").mkdir()
    search = searcher(spec, tmp_path / "fixed")  # Tune sets no search space when nothing is searched
    configs = [search.suggest(f"t{i}") for i in range(3)]
    assert configs == [{"trial_index": 0}, {"trial_index": 1}, {"trial_index": 2}]


def test_a_search_of_one_fixed_configuration_runs(local_ray, tmp_path):
    fixed = ["lr=1.0e-3", "decay_steps=100", "l2_weight=0.1", "weight_decay=0.01", "num_samples=1"]
    outcome = run_search(load_spec(QUICK, TINY + fixed), name="fixed", results_dir=tmp_path)
    assert outcome.trials.status.tolist() == ["completed"] and outcome.best is not None
    assert outcome.trials.val_rmse.notna().all()


def test_asha_stops_weak_trials_early(local_ray, tmp_path):
    spec = load_spec(
        QUICK,
        TINY
        + [
            "num_samples=4",
            "iterations=8",
            "scheduler.reduction_factor=3",
            "lr={distribution: loguniform, low: 1.0e-6, high: 0.3}",
            RECIPES,
        ],
    )
    outcome = run_search(spec, name="asha", results_dir=tmp_path)
    first = outcome.trials.sort_values("trial_index").head(2)  # the recipes ran first, on the real cluster
    assert first[list(spec.searched())].to_dict("records") == spec.start_from
    history = pd.read_parquet(outcome.path / "history.parquet")
    reports = history.groupby("trial_id").iteration.max()
    stopped = outcome.trials[outcome.trials.status == "stopped_early"]
    assert len(stopped) >= 1 and (outcome.trials.status == "completed").any()
    for row in stopped.itertuples():
        assert reports[row.trial_id] == row.iteration < 8
    assert reports.max() == 8
