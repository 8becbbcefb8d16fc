"""Real searches on a real local Ray cluster: Tune + Optuna (+ ASHA, PBT) driving Ray Train runs."""

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUICK, TINY, TINY_SEARCH, placement_groups_left
from PIL import Image
from rich.console import Console

from raybone.data import prepare
from raybone.errors import DataError, RayboneError, SpecError
from raybone.spec import load_spec
from raybone.tuning.cluster import concurrent_trials
from raybone.tuning.progress import TrialProgress
from raybone.tuning.run import run_search
from raybone.tuning.trial import trial_seed


@pytest.fixture(scope="module")
def tiny_search(tiny_experiment):
    return load_spec(QUICK, TINY_SEARCH), tiny_experiment[1]


def test_search_writes_one_row_per_trial(tiny_search):
    spec, outcome = tiny_search
    trials = pd.read_parquet(outcome.path / "trials.parquet")
    assert len(trials) == 4 and trials.trial_id.is_unique
    assert sorted(trials.trial_index) == [0, 1, 2, 3]
    for name in ("lr", "decay_steps", "l2_weight", "weight_decay"):
        low, high = spec.train[name].low, spec.train[name].high
        assert trials[name].between(low, high).all(), name
    assert set(trials.status) <= {"completed", "stopped_early"}
    assert (trials.iteration >= 2).all() and (trials.iteration <= 4).all()
    assert trials.val_top1.between(0, 1).all() and (trials.val_top2 >= trials.val_top1).all()
    assert (trials.val_rmse >= 0).all() and (trials.wall_time_s > 0).all()
    for checkpoint in trials.checkpoint_path:
        assert (Path(checkpoint) / "checkpoint.pt").is_file()


def test_trials_train_in_the_channels_last_layout(tiny_search):
    """On a CPU too: the worker moves the weights to NHWC (spec channels_last, on by default), which the
    checkpoint keeps."""
    from raybone.core.checkpoint import read_checkpoint

    spec, outcome = tiny_search
    assert spec.train_config({}).channels_last
    for checkpoint in outcome.trials.checkpoint_path:
        weight = read_checkpoint(checkpoint)["model"]["conv3.conv.weight"]  # 3x3 over 64 channels: layouts differ
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


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
    assert outcome.best is not None and outcome.best.best_val_rmse == outcome.trials.best_val_rmse.min()


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


def _searcher(spec, folder, warm_start=()):
    from raybone.tuning.searcher import OptunaSearcher

    folder.mkdir(exist_ok=True)
    return OptunaSearcher(spec, folder, warm_start)


def _sampled(spec, folder, count):
    search = _searcher(spec, folder)
    return [search.suggest(f"t{i}") for i in range(count)]


def test_one_seed_gives_one_sequence_of_sampled_configs(tmp_path):
    spec = load_spec(QUICK)
    first, again = _sampled(spec, tmp_path / "a", 5), _sampled(spec, tmp_path / "b", 5)
    other = _sampled(load_spec(QUICK, ["seed=1"]), tmp_path / "c", 5)
    assert first == again
    assert [c["trial_index"] for c in first] == [0, 1, 2, 3, 4]
    assert [c["lr"] for c in first] != [c["lr"] for c in other]


@pytest.mark.parametrize("kind", ["tpe", "gp", "cmaes", "random", "qmc"])
def test_every_sampler_draws_seeded_configs_inside_the_space(tmp_path, kind):
    spec = load_spec(QUICK, [f"searcher.type={kind}", "num_samples=6"])
    first, again = _searcher(spec, tmp_path / "a"), _searcher(spec, tmp_path / "b")
    configs = []
    for i in range(5):  # past the start-up trials, with results told, so the model-based samplers model
        configs.append(first.suggest(f"t{i}"))
        assert again.suggest(f"t{i}") == configs[-1]
        for search in (first, again):
            search.on_trial_complete(f"t{i}", {spec.metric: 3.0 + (i % 3), "iteration": spec.iterations})
    for config in configs:
        for name, param in spec.searched().items():
            assert param.low <= config[name] <= param.high, (kind, name, config[name])


def test_an_unknown_sampler_is_refused_before_ray_starts():
    with pytest.raises(SpecError, match="searcher.type: Input should be 'tpe', 'gp', 'cmaes', 'random' or 'qmc'"):
        load_spec(QUICK, ["searcher.type=bayes"])


@pytest.mark.parametrize("samples, models_third_trial", [(6, True), (30, False)])
def test_tpe_models_results_after_a_third_of_a_small_search(tmp_path, samples, models_third_trial):
    """Optuna's 10 random start-up trials would make a search of 10 trials or fewer plain random search."""
    spec = load_spec(QUICK, [f"num_samples={samples}"])
    thirds = []
    for name, values in (("a", (1.0, 5.0)), ("b", (5.0, 1.0))):  # the same two trials, opposite results
        search = _searcher(spec, tmp_path / name)
        for i, value in enumerate(values):
            search.suggest(f"t{i}")
            search.on_trial_complete(f"t{i}", {spec.metric: value, "iteration": spec.iterations})
        thirds.append(search.suggest("t2"))
    assert (thirds[0] != thirds[1]) == models_third_trial


def test_trials_are_told_complete_with_their_best_pruned_or_failed(tmp_path):
    import optuna

    spec = load_spec(QUICK)
    search = _searcher(spec, tmp_path / "s")
    for i in range(3):
        search.suggest(f"t{i}")
    for iteration, value in ((30, 3.0), (60, 2.5), (90, 2.7)):
        search.on_trial_result("t0", {spec.metric: value, "iteration": iteration})
    search.on_trial_complete("t0", {spec.metric: 2.9, "iteration": 120})  # full budget
    search.on_trial_result("t1", {spec.metric: 4.0, "iteration": 30})
    search.on_trial_complete("t1", {spec.metric: 3.8, "iteration": 60})  # stopped at 60 by the scheduler
    search.on_trial_complete("t2", None, error=True)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's' / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0].value == 2.5  # the best it reported: the checkpoint raybone keeps
    assert trials[0].intermediate_values == {30: 3.0, 60: 2.5, 90: 2.7, 120: 2.9}
    assert trials[1].intermediate_values == {30: 4.0, 60: 3.8}  # at SGD iterations, not report counts
    assert [t.user_attrs["ray_trial_id"] for t in trials] == ["t0", "t1", "t2"]


def test_a_resumed_searcher_keeps_its_trial_map(tmp_path):
    import pickle

    spec = load_spec(QUICK)
    search = _searcher(spec, tmp_path / "s")
    search.suggest("t0")
    search.save(tmp_path / "searcher.json")
    restored = pickle.loads(pickle.dumps(search))  # as Tune stores it with the experiment
    restored.restore(tmp_path / "searcher.json")
    restored.on_trial_complete("t0", {spec.metric: 2.0, "iteration": spec.iterations})
    assert restored.study.trials[0].state.name == "COMPLETE" and restored.study.trials[0].value == 2.0
    # The driver died after the study heard the trial end and before Tune saved that it had: resumed, Tune runs the
    # trial again, its run repeats its last result, and the trial ends again (Optuna refuses a second tell).
    again = pickle.loads(pickle.dumps(search))
    again.restore(tmp_path / "searcher.json")
    again.on_trial_result("t0", {spec.metric: 2.0, "iteration": spec.iterations})
    again.on_trial_complete("t0", {spec.metric: 2.0, "iteration": spec.iterations})
    assert again.study.trials[0].state.name == "COMPLETE" and again.study.trials[0].value == 2.0


def test_a_warm_start_seeds_the_study_with_an_earlier_experiments_trials(tmp_path):
    from raybone.experiments.study import finished_trials

    spec = load_spec(QUICK)
    earlier = pd.DataFrame(
        [
            {
                "trial_id": "a",
                "status": "completed",
                "lr": 1e-3,
                "decay_steps": 60,
                "l2_weight": 0.1,
                "weight_decay": 0.01,
                "val_rmse": 3.0,
                "best_val_rmse": 2.5,
                "iteration": 120,
            },
            {
                "trial_id": "b",
                "status": "stopped_early",
                "lr": 2e-3,
                "decay_steps": 60,
                "l2_weight": 0.1,
                "weight_decay": 0.01,
                "val_rmse": 3.5,
                "best_val_rmse": 3.5,
                "iteration": 30,
            },
            {
                "trial_id": "c",
                "status": "completed",
                "lr": 0.05,
                "decay_steps": 60,
                "l2_weight": 0.1,
                "weight_decay": 0.01,
                "val_rmse": 2.0,
                "best_val_rmse": 2.0,
                "iteration": 120,
            },  # lr outside this space
        ]
    )
    trials, skipped = finished_trials(earlier, spec, with_pruned=True)
    assert [(t.user_attrs["ray_trial_id"], t.state.name, t.value) for t in trials] == [
        ("a", "COMPLETE", 2.5),
        ("b", "PRUNED", None),
    ]
    assert skipped == ["trial c: lr 0.05 outside this space"]
    search = _searcher(spec, tmp_path / "warm", trials)
    assert search.suggest("t0")["trial_index"] == 2  # after the two earlier trials
    assert [t.state.name for t in search.study.trials[:2]] == ["COMPLETE", "PRUNED"]


RECIPES = (
    "start_from=[{lr: 1.0e-4, decay_steps: 100, l2_weight: 1.0, weight_decay: 0.1}, "
    "{lr: 3.0e-3, decay_steps: 30, l2_weight: 1.0e-3, weight_decay: 1.0e-4}]"
)


def test_a_search_starts_from_the_given_configurations_once(tmp_path):
    spec = load_spec(QUICK, [RECIPES])
    first = _searcher(spec, tmp_path / "s")
    assert first.suggest("t0") == {**spec.start_from[0], "trial_index": 0}
    # Resumed (a new searcher on the same study): the second recipe is still due, the first is not run again.
    again = _searcher(spec, tmp_path / "s")
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
    search = _searcher(load_spec(QUICK, fixed), tmp_path / "fixed")
    configs = [search.suggest(f"t{i}") for i in range(3)]
    assert configs == [{"trial_index": 0}, {"trial_index": 1}, {"trial_index": 2}]


def test_a_search_of_one_fixed_configuration_runs_and_checkpoints_its_weight_average(local_ray, tmp_path):
    """Nothing searched: the searcher suggests the fixed configuration. With `ema`, the checkpoint's model is the
    average of the weights, the last weights kept beside it (one search for both: each costs a trial's start)."""
    from raybone.core.checkpoint import read_checkpoint

    fixed = ["lr=3.0e-3", "decay_steps=100", "l2_weight=0.1", "weight_decay=0.01", "num_samples=1", "ema=0.5"]
    outcome = run_search(load_spec(QUICK, TINY + fixed), name="fixed", results_dir=tmp_path)
    assert outcome.trials.status.tolist() == ["completed"] and outcome.best is not None
    assert outcome.trials.val_rmse.notna().all()
    state = read_checkpoint(outcome.trials.checkpoint_path.iloc[0])
    assert state["config"]["ema"] == 0.5 and {"training_model", "average"} <= set(state)
    averaged = {k: v for k, v in state["average"].items() if k.startswith("module.")}
    assert all(torch.equal(state["model"][k.removeprefix("module.")], v) for k, v in averaged.items())
    differs = [
        k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, state["training_model"][k])
    ]
    assert differs  # the average is not the last weights


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
    # A trial ASHA stops leaves no placement group behind (one once held a CPU: the trials after it never started).
    # Before the fix about one search in four left one, so this catches a regression only now and then.
    assert not placement_groups_left()
    first = outcome.trials.sort_values("trial_index").head(2)  # the recipes ran first, on the real cluster
    assert first[list(spec.searched())].to_dict("records") == spec.start_from
    history = pd.read_parquet(outcome.path / "history.parquet")
    reports = history.groupby("trial_id").iteration.max()
    stopped = outcome.trials[outcome.trials.status == "stopped_early"]
    assert len(stopped) >= 1 and (outcome.trials.status == "completed").any()
    for row in stopped.itertuples():
        assert reports[row.trial_id] == row.iteration < 8
    assert reports.max() == 8
    # Every trial's best report survives as a checkpoint, and the table says which one it is.
    for row in outcome.trials.itertuples():
        own = history[history.trial_id == row.trial_id]
        assert row.best_val_rmse == own.val_rmse.min()
        assert row.best_iteration == own[own.val_rmse == own.val_rmse.min()].iteration.max()
        assert (Path(row.best_checkpoint_path) / "checkpoint.pt").is_file()
    assert outcome.best.best_val_rmse == outcome.trials.best_val_rmse.min()
    # The Optuna study names the same trials, and a trial the scheduler stopped is PRUNED, not COMPLETE.
    import optuna

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{outcome.path / 'optuna.db'}")
    for row in outcome.trials.itertuples():
        trial = study.trials[row.trial_index]
        assert trial.user_attrs["ray_trial_id"] == row.trial_id
        assert max(trial.intermediate_values) == row.iteration  # steps are SGD iterations
        if row.status == "stopped_early":
            assert trial.state == optuna.trial.TrialState.PRUNED
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == row.best_val_rmse


def test_a_trial_relays_every_report_even_when_its_run_ends_the_moment_it_reports(local_ray, tmp_path):
    """The race Train's TuneReportCallback loses: the run's last report and its end reach the trial together."""
    import ray.train
    import ray.tune
    from ray.util.queue import Queue

    from raybone.tuning.trial import _Relay, _relay_to_tune

    folder = str(tmp_path)

    class RunThatEndsAtOnce:  # stands in for a TorchTrainer: reports through its controller's callback, returns
        def __init__(self, reports, fails):
            self.relay, self.fails = _Relay(reports), fails

        def fit(self):
            for iteration in (1, 2, 3):  # the second report comes without a checkpoint
                checkpoint = None if iteration == 2 else ray.train.Checkpoint(folder)
                self.relay.after_report(None, [{"iteration": iteration, "val_rmse": 1.0 / iteration}], checkpoint)
            if self.fails:
                raise ValueError("worker lost")

    def trial(config):
        reports = Queue(actor_options={"num_cpus": 0})
        _relay_to_tune(RunThatEndsAtOnce(reports, config["fails"]), reports, None)

    grid = ray.tune.Tuner(
        trial,
        param_space={"fails": ray.tune.grid_search([False, False, False, True])},
        run_config=ray.tune.RunConfig(name="relay", storage_path=str(tmp_path), verbose=0),
    ).fit()
    for result in grid:
        assert result.metrics_dataframe.iteration.tolist() == [1, 2, 3]
        assert result.metrics_dataframe.checkpoint_path.tolist()[::2] == [folder, folder]
        assert result.metrics_dataframe.checkpoint_path.isna().tolist() == [False, True, False]
        assert (result.error is not None) == result.config["fails"]
        if result.error is not None:
            assert "worker lost" in str(result.error)


# A trial stuck at its first weights and one that learns: asynchronous PBT compares a trial at its own interval with
# the others' last scores, so only a population whose order holds is sure to exploit (here at iteration 8 or 12).
# The learning one's weight decay sits at the space's upper bound, where a copy perturbed by 1.2 must be clipped.
_STUCK_AND_LEARNING = (
    "start_from=[{lr: 1.0e-5, decay_steps: 60, l2_weight: 0.1, weight_decay: 0.01},"
    " {lr: 3.0e-3, decay_steps: 60, l2_weight: 0.1, weight_decay: 0.3}]"
)


@pytest.mark.parametrize(
    "iterations, burn_in, mode",
    [
        # Every trial waits for the rest at each interval; the worst copies, first at the burn-in's end, not at 4.
        (8, 6, ["scheduler.synchronous=true"]),
        (16, 0, [_STUCK_AND_LEARNING]),  # asynchronous (the default): the donor trains on while the worst copies it
    ],
    ids=["synchronous", "asynchronous"],
)
def test_pbt_continues_a_perturbed_trial_from_its_donors_iteration_and_weights(
    local_ray, tmp_path, iterations, burn_in, mode
):
    from raybone.core.checkpoint import read_checkpoint

    spec = load_spec(
        QUICK,
        TINY
        + [
            f"iterations={iterations}",
            "scheduler.type=pbt",
            "scheduler.perturbation_interval=4",
            "scheduler.quantile_fraction=0.5",
            f"scheduler.burn_in_period={burn_in}",
            "lr={distribution: loguniform, low: 1.0e-5, high: 0.1}",
            *mode,
        ],
    )
    outcome = run_search(spec, name="pbt", results_dir=tmp_path)
    assert (outcome.trials.status == "completed").all() and (outcome.trials.iteration == iterations).all()
    assert sorted(outcome.trials.trial_index) == [0, 1]
    history = pd.read_parquet(outcome.path / "history.parquet")
    exploits = history[history.exploited_from.notna()]
    assert len(exploits), "no trial exploited the other"
    assert exploits.resumed_from.min() >= burn_in  # none copied a score from before the curves could rank
    first = exploits.sort_values("iteration").groupby("trial_id").head(1)
    for row in first.itertuples():
        donor = row.exploited_from
        assert donor != row.trial_id and re.search(f"/trial-{donor}(-[0-9a-f]{{6}})?/", row.restored_from)  # its run
        state = read_checkpoint(row.restored_from)
        assert state["iteration"] == row.resumed_from > 0  # it continued at the donor's iteration ...
        donors_reports = history[(history.trial_id == donor) & (history.checkpoint_path == row.restored_from)]
        assert donors_reports.iteration.tolist() == [row.resumed_from]  # ... from the donor's reported checkpoint
        assert row.iteration == row.resumed_from + 2  # and reported two iterations later
    assert (history.resumed_from < iterations).all()  # at the last iteration no trial paused or copied a finished one
    lineage = history.dropna(subset=["exploited_from"])
    assert (lineage.exploited_from != lineage.trial_id).all()
    for trial, reports in history.groupby("trial_id"):  # no report lost where a trial paused and restarted
        assert set(range(2, iterations + 1, 2)) <= set(reports.iteration), trial
    for row in outcome.trials.to_dict("records"):  # what trained is what trials.parquet records, in the space
        # A run restarted after its last iteration reports again without a checkpoint: its latest one trained it.
        saved = history[(history.trial_id == row["trial_id"]) & history.checkpoint_path.notna()]
        trained = read_checkpoint(saved.sort_values("iteration").checkpoint_path.iloc[-1])["config"]
        for name, param in spec.searched().items():
            assert row[name] == trained[name] and param.low <= row[name] <= param.high, (name, row[name])


def test_a_perturbed_pbt_configuration_is_clipped_into_the_searched_ranges():
    from raybone.tuning.pbt import within_space

    spec = load_spec(QUICK, ["scheduler.type=pbt"])
    perturbed = {"trial_index": 1, "lr": 3.6e-3, "decay_steps": 29.4, "l2_weight": 0.5, "weight_decay": 0.36}
    clipped = {"trial_index": 1, "lr": 3.0e-3, "decay_steps": 30, "l2_weight": 0.5, "weight_decay": 0.3}
    assert within_space(perturbed, spec) == clipped


def test_pbt_shifts_a_searched_choice_to_a_neighbouring_choice_and_perturbs_a_range():
    from ray.tune.search.sample import Domain

    from raybone.tuning.pbt import mutations

    spec = load_spec(QUICK, ["scheduler.type=pbt", "weight_decay={choices: [0.0, 0.01, 0.1]}"])
    found = mutations(spec)
    assert found["weight_decay"] == [0.0, 0.01, 0.1]  # a list: Ray moves to a neighbour, never multiplies off it
    assert set(found) == {"lr", "l2_weight", "weight_decay"} and isinstance(found["lr"], Domain)
    assert (found["lr"].lower, found["lr"].upper) == (1.0e-4, 3.0e-3)


def test_a_pbt_population_larger_than_the_trials_at_once_is_called_out():
    from raybone.tuning.pbt import population_warning

    spec = load_spec(QUICK, ["scheduler.type=pbt", "num_samples=5"])
    assert population_warning(spec, 5) is None
    warning = population_warning(spec, 2)
    assert "trains as 3 groups of up to 2, one after another; each exploiting only within itself" in warning
    synchronous = load_spec(QUICK, ["scheduler.type=pbt", "scheduler.synchronous=true", "num_samples=4"])
    assert "2 groups of up to 2, one after another; only the first exploits" in population_warning(synchronous, 2)
    assert population_warning(load_spec(QUICK, ["num_samples=5"]), 2) is None  # ASHA starts trials as others end


def test_the_progress_line_counts_only_trials_still_running_and_names_a_failed_trials_error(tmp_path, capsys):
    # Tune calls on_trial_complete while the ending trial's status is still RUNNING, on_trial_error after it set
    # ERROR (tune_controller.py); the line said "1 running" after the last trial had finished.
    import ray.cloudpickle

    progress = TrialProgress(load_spec(QUICK, TINY))
    progress.setup()
    first, second = (SimpleNamespace(trial_id=i, status="RUNNING", last_result={}) for i in ("a", "b"))
    trials = [first, second]
    second.pickled_error_file, second.error_file = str(tmp_path / "error.pkl"), None  # where Tune writes the error
    with open(second.pickled_error_file, "wb") as file:
        ray.cloudpickle.dump(RuntimeError("[/enforce fail at alloc_cpu.cpp:117] the worker ran\nout of memory"), file)

    def description():
        return progress._progress.tasks[0].description

    try:
        for trial in trials:
            progress.on_trial_start(0, trials, trial)
        progress.on_trial_result(0, trials, first, {"iteration": 2, "val_rmse": 3.5})
        progress.on_trial_result(0, trials, second, {"iteration": 4, "val_rmse": 3.6})
        assert description() == "2 running, best val_rmse 3.500"
        progress.on_experiment_end(trials)  # as after an error in Tune
        assert description() == "stopped, best val_rmse 3.500"
        first.status = second.status = "TERMINATED"  # as after Ctrl-C: Tune stops them without a word
        progress.on_experiment_end(trials)
        assert description() == "stopped, best val_rmse 3.500"
        first.status = second.status = "RUNNING"
        progress.on_trial_complete(0, trials, first)
        assert description() == "1 running, best val_rmse 3.500"
        first.status, second.status = "TERMINATED", "ERROR"
        progress.on_trial_error(0, trials, second)
        assert description() == "0 running, best val_rmse 3.500"
        # printed as it is: rich would read the bracket as markup (a closing tag raised, and stopped the search)
        failed = "trial b failed at iteration 4: [/enforce fail at alloc_cpu.cpp:117] the worker ran out of memory"
        assert failed in " ".join(capsys.readouterr().out.split())
        progress.on_experiment_end(trials)
        assert description() == "finished, best val_rmse 3.500"
    finally:
        progress._progress.stop()


def test_a_trials_last_line_says_how_it_ended_and_names_the_checkpoint_kept(capsys):
    """Of equal scores Train keeps the latest checkpoint and trials.parquet names it; the line named the first. A
    diverged report (NaN) scores nothing. A trial the scheduler stopped was said to have finished."""
    progress = TrialProgress(load_spec(QUICK, [*TINY, "iterations=6"]))  # a validation every 2
    progress.setup()
    kept, stopped = (SimpleNamespace(trial_id=i, status="RUNNING", last_result={}) for i in ("a", "b"))
    trials = [kept, stopped]
    try:
        for trial in trials:
            progress.on_trial_start(0, trials, trial)
        for trial, reports in ((kept, [(2, 3.58), (4, 3.58), (6, float("nan"))]), (stopped, [(2, 3.7)])):
            for iteration, rmse in reports:
                trial.last_result = {"iteration": iteration, "val_rmse": rmse}
                progress.on_trial_result(0, trials, trial, trial.last_result)
            progress.on_trial_complete(0, trials, trial)
    finally:
        progress._progress.stop()
    printed = " ".join(capsys.readouterr().out.split())
    assert "trial a finished at iteration 6: val_rmse nan (its best 3.580 at iteration 4, kept)" in printed
    assert "trial b stopped early at iteration 2: val_rmse 3.700 (its best 3.700 at iteration 2, kept)" in printed


def test_a_failed_trials_error_is_read_from_the_files_tune_writes_beside_it(tmp_path):
    import ray.cloudpickle

    from raybone.tuning.tables import trial_error

    trial = SimpleNamespace(pickled_error_file=None, error_file=None)
    assert trial_error(trial) == "no error recorded"
    trial.error_file = tmp_path / "error.txt"  # Tune pickles only task and actor errors; the text has each failure
    trial.error_file.write_text("Failure # 1 (occurred at 2026-12-06)\nfirst\nFailure # 2 (occurred at ...)\nlast\n")
    assert trial_error(trial) == "last"
    trial.pickled_error_file = tmp_path / "error.pkl"
    cause = ValueError("what the trial raised")
    with open(trial.pickled_error_file, "wb") as file:
        ray.cloudpickle.dump(SimpleNamespace(cause=cause), file)  # a Ray task error carries it as its cause
    assert trial_error(trial) == "what the trial raised"
    # Train's error leads with the workers' tracebacks (a one-line squash of them was shown): the worker's error.
    traceback = 'Traceback (most recent call last):\n  File "engine.py", line 59\nValueError: torch.cat(): empty'
    train = ray.train.WorkerGroupError(f"[Rank 0]\n{traceback}", {0: ValueError("torch.cat(): empty")})
    with open(trial.pickled_error_file, "wb") as file:
        ray.cloudpickle.dump(SimpleNamespace(cause=train), file)
    assert trial_error(trial) == "ValueError on a Train worker: torch.cat(): empty"


def test_only_trials_seen_to_end_without_an_error_count_as_ended():
    from raybone.tuning.tables import ended_trials

    live = pd.DataFrame({"trial_id": list("abcd"), "status": ["completed", "stopped_early", "running", "error"]})
    # d failed before a resume, which restarts it: stopped by Ctrl-C again before it reported, it has not ended
    assert ended_trials(live) == {"a", "b"}
    assert ended_trials(None) == set()


def test_a_resume_on_other_data_is_refused_and_the_experiment_kept(tiny_experiment, tmp_path):
    # The unfinished trials would go on training on other images or readings, and environment.json would then
    # record only the new data.
    shutil.copytree(tiny_experiment[1].path, tmp_path / "tiny")
    (tmp_path / "tiny" / "trials.parquet").unlink()  # as if the driver died before the search ended
    environment_file = tmp_path / "tiny" / "environment.json"
    environment = json.loads(environment_file.read_text())
    environment["data_fingerprint"] = "0" * 64
    environment["data_meta"].update(images_sha256="0" * 64, content_sha256="0" * 64)
    environment_file.write_text(json.dumps(environment))
    with pytest.raises(RayboneError, match=r"cannot resume 'tiny': its trials started on other data"):
        run_search(load_spec(QUICK, TINY_SEARCH), name="tiny", results_dir=tmp_path, resume=True)
    assert json.loads(environment_file.read_text()) == environment


def test_a_resume_with_another_spec_is_refused_and_the_experiment_kept(tiny_experiment, tmp_path):
    # Resuming trains the unfinished trials with the given spec and rewrites spec.yaml: another spec would mix
    # two trainings in one experiment under the new one's name.
    shutil.copytree(tiny_experiment[1].path, tmp_path / "tiny")
    saved = (tmp_path / "tiny" / "spec.yaml").read_text()
    changed = load_spec(QUICK, TINY_SEARCH + ["ema=0.99", "resources.cpus_per_worker=2"])
    with pytest.raises(SpecError, match=r"cannot resume 'tiny'.*\(train\.ema: 0\.0 -> 0\.99\); only") as refused:
        run_search(changed, name="tiny", results_dir=tmp_path, resume=True)
    assert "cpus_per_worker" not in str(refused.value)  # where trials run may change on resume
    assert (tmp_path / "tiny" / "spec.yaml").read_text() == saved
    output = Console(file=io.StringIO())
    same = load_spec(QUICK, TINY_SEARCH + ["resources.cpus_per_worker=2"])
    run_search(same, name="tiny", results_dir=tmp_path, resume=True, console=output)
    assert "already finished (4 trials); nothing to resume" in output.file.getvalue()


def _hands(root: Path, per_year: int) -> Path:
    """An RSNA-layout folder with `per_year` radiographs in each of three bone-age years."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, months in enumerate([30, 90, 150] * per_year):
        Image.fromarray(np.full((48, 40), 20 + 10 * i, np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(f"{i},{months},True\n")
    (root / "boneage.csv").write_text("id,boneage,male\n" + "".join(rows))
    return root


def _no_cluster(monkeypatch):
    """Fail the test if the search gets as far as starting (or joining) a Ray cluster."""

    def start(*args, **kwargs):
        raise AssertionError("the search started a cluster before refusing")

    monkeypatch.setattr("raybone.tuning.run._start_cluster", start)


def test_data_without_validation_images_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """A trial scored nothing: every try failed deep in the worker with a traceback, and a resume was offered."""
    from typer.testing import CliRunner

    from raybone.cli import app

    source = _hands(tmp_path / "hands", per_year=1)
    said = CliRunner().invoke(app, ["data", "prepare", str(source), "--out", str(tmp_path / "prepared")])
    assert said.exit_code == 0, said.output
    warning = " ".join(said.stderr.split())
    assert f"warning: {source}: no validation images (3 train / 0 val)" in warning
    assert "a year needs 2 or more to give one; add radiographs (a search refuses data without them)" in warning
    spec = load_spec(QUICK, TINY + [f"data.source={tmp_path / 'prepared'}"])
    _no_cluster(monkeypatch)
    with pytest.raises(DataError, match=r"hands: no validation images \(3 train / 0 val\).*add radiographs"):
        run_search(spec, name="noval", results_dir=tmp_path / "results")
    assert not (tmp_path / "results" / "noval").exists()
    _hands(tmp_path / "pairs", per_year=2)  # at val_fraction 0.1 two a year give none
    fewer = load_spec(QUICK, TINY + [f"data.source={tmp_path / 'pairs'}", "data.val_fraction=0.1"])
    with pytest.raises(DataError, match=r"a year needs 5 or more to give one"):
        run_search(fewer, name="fewer", results_dir=tmp_path / "results")


def test_an_input_size_above_the_prepared_images_names_the_fix_that_works(tmp_path, monkeypatch):
    """A prepared folder keeps its image size: raising data.image_size (the advice given) changed nothing."""
    _no_cluster(monkeypatch)
    source = _hands(tmp_path / "hands", per_year=2)
    prepared = prepare(source, out=tmp_path / "prepared", image_size=32, progress=False)
    given = load_spec(QUICK, TINY + [f"data.source={prepared.path}", "data.image_size=64", "input_size=48"])
    again = rf"\(32 px\); a prepared folder keeps its size: raybone data prepare {source} --image-size 48 --out NEW"
    with pytest.raises(SpecError, match=again):
        run_search(given, name="small", results_dir=tmp_path / "results")
    from_source = load_spec(QUICK, TINY + [f"data.source={source}", "input_size=48"])
    with pytest.raises(SpecError, match=r"\(40 px\); raise data.image_size to 48 or more, or lower train.input_size"):
        run_search(from_source, name="small", results_dir=tmp_path / "results")
