"""raybone beside the tools users already run: live tables, MLflow and W&B, the Python API, comparisons."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from conftest import WATCHED
from PIL import Image
from typer.core import TyperGroup
from typer.testing import CliRunner

import raybone
from raybone.cli import app

runner = CliRunner()


def test_the_tables_grow_while_a_search_runs(watched_search):
    running = [reports for statuses, reports in watched_search.seen if "running" in statuses]
    assert running, f"never saw a running trial in the tables: {watched_search.seen}"
    assert len(set(running)) >= 2  # the history grew between two reads
    final = pd.read_parquet(watched_search.path / "trials.parquet")
    assert set(final.status) == {"completed"} and len(pd.read_parquet(watched_search.path / "history.parquet")) == 8


def test_a_search_logs_to_mlflow_and_wandb(watched_search, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.chdir(watched_search.workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{watched_search.mlflow_db}")
    trials = pd.read_parquet(watched_search.path / "trials.parquet")
    runs = mlflow.search_runs(experiment_names=[WATCHED], output_format="list")
    assert sorted(run.data.tags["trial_name"] for run in runs) == sorted(f"run_trial_{t}" for t in trials.trial_id)
    client = mlflow.MlflowClient()
    for run in runs:
        assert {"lr", "decay_steps", "l2_weight", "weight_decay"} <= set(run.data.params)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_rmse")]
        assert steps == [2, 4]  # SGD iterations, not report counts
    best = next(r for r in runs if r.data.tags["trial_name"] == f"run_trial_{watched_search.outcome.best.trial_id}")
    assert [a.path for a in client.list_artifacts(best.info.run_id, "best_checkpoint")] == [
        "best_checkpoint/checkpoint.pt"
    ]
    offline = [p for p in (watched_search.wandb_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    assert len(offline) == 4


def test_an_unavailable_logger_is_refused_before_ray_starts(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name.startswith("ray.air.integrations.mlflow"):
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    result = runner.invoke(app, ["search", "--logger", "mlflow", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: loggers: mlflow needs the mlflow-skinny package: python -m pip install 'raybone[mlflow]'"
    )


def test_the_python_api_loads_experiments_and_models(tiny_experiment, tiny_model, tmp_path):
    results, outcome = tiny_experiment
    experiment = raybone.load_experiment(results / "tiny")
    assert experiment.name == "tiny" and len(experiment.trials()) == len(outcome.trials)
    assert raybone.load_experiment(results, "tiny").best().trial_id == experiment.best().trial_id
    assert raybone.load_experiment(f"file://{results}/tiny").spec == experiment.spec
    model = raybone.load_model(tiny_model)
    hand = np.random.default_rng(0).integers(0, 256, (60, 50), dtype=np.uint8)
    Image.fromarray(hand).save(tmp_path / "hand.png")
    table = model.predict([tmp_path / "hand.png", hand])
    assert list(table.file) == [str(tmp_path / "hand.png"), "1"]
    np.testing.assert_allclose(table.filter(like="p_").iloc[0], table.filter(like="p_").iloc[1], atol=1e-6)
    assert table.predicted_years.between(0, 19).all()


def test_the_readmes_python_example_runs_as_it_is(local_ray, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    example = section[
        section.index("```python") + len("```python") : section.index("```", section.index("```python") + 3)
    ]
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 50), dtype=np.uint8)).save("hand.png")
    scope: dict = {}
    exec(compile(example, "README.md (Python API)", "exec"), scope)
    assert scope["experiment"].name == "notebook" and len(scope["experiment"].trials()) == 2
    assert (tmp_path / "notebook-model" / "model.json").is_file()
    assert scope["again"].best().trial_id == scope["best"].trial_id


def test_two_experiments_compare_side_by_side(tiny_experiment, tmp_path):
    import shutil

    results, _ = tiny_experiment
    shutil.copytree(results / "tiny", tmp_path / "tiny")
    shutil.copytree(results / "tiny", tmp_path / "other")
    spec = (tmp_path / "other" / "spec.yaml").read_text().replace("seed: 0", "seed: 7")
    (tmp_path / "other" / "spec.yaml").write_text(spec)
    shown = runner.invoke(app, ["results", "tiny", "other", "--results-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "the best model of each experiment" in shown.stdout and "where their specs differ" in shown.stdout
    differs = shown.stdout[shown.stdout.index("where their specs differ") :]
    assert "seed" in differs and "lr" not in differs  # only what differs
    rows = json.loads(
        runner.invoke(app, ["results", "tiny", "other", "--results-dir", str(tmp_path), "--format", "json"]).stdout
    )
    assert [r["experiment"] for r in rows] == ["tiny", "other"] and rows[0]["best"] == rows[1]["best"]
    # One whose trials all failed is listed without a model (it aborted the comparison); a name given twice once.
    failed = shutil.copytree(results / "tiny", tmp_path / "failed")
    trials = pd.read_parquet(failed / "trials.parquet")
    trials[[c for c in trials if c.startswith(("val_", "best_val_"))]] = float("nan")
    trials.assign(status="error").to_parquet(failed / "trials.parquet")
    pd.read_parquet(failed / "history.parquet").head(0).to_parquet(failed / "history.parquet")  # no report
    both = runner.invoke(app, ["results", "tiny", "failed", "tiny", "--results-dir", str(tmp_path), "--format", "json"])
    assert both.exit_code == 0, both.output
    rows = json.loads(both.stdout)
    assert [(r["experiment"], r["trial_id"] is None) for r in rows] == [("tiny", False), ("failed", True)]
    assert rows[1]["best"] is None and rows[1]["trials"] == 4


def test_predict_shows_whole_names_and_warns_about_a_demo_model(tiny_model, tmp_path):
    folder = tmp_path / "a rather long folder name for radiographs" / "from a hospital archive"
    folder.mkdir(parents=True)
    name = "a-very-long-radiograph-file-name-that-a-narrow-terminal-would-have-cut-2026-12-01.png"
    hand = np.random.default_rng(1).integers(0, 256, (60, 50), dtype=np.uint8)
    Image.fromarray(hand).save(folder / name)
    result = runner.invoke(app, ["predict", str(tiny_model), str(folder.parent)], terminal_width=60)
    assert result.exit_code == 0, result.output
    flat = "".join(ch for ch in result.stdout if ch not in " \n│┃")  # the cell's lines, read in order
    assert name in flat  # wrapped, never cut
    assert result.stderr.count("warning:") == 1 and "synthetic phantom demo atlas" in result.stderr


def _readme_commands() -> list[list[str]]:
    """Every `raybone ...` line of the README's bash blocks, continuation lines joined, comments and redirects cut."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0].split(">")[0], comments=True)
            if words[:1] == ["raybone"]:
                commands.append(words[1:])
    return commands


def test_every_command_in_the_readme_parses():
    """Each README command names a real subcommand with options it has and values they accept (parsed by the
    CLI's own parser, not run: the search examples need a cluster and the RSNA data)."""
    group = typer.main.get_command(app)
    commands = _readme_commands()
    assert len(commands) >= 15
    for words in commands:
        command, rest = group, words
        while isinstance(command, TyperGroup):
            command, rest = command.get_command(typer.Context(command), rest[0]), rest[1:]
            assert command is not None, f"README: raybone {' '.join(words)}: no such command"
        try:
            command.make_context("raybone", list(rest))
        except Exception as err:  # typer's own click raises its UsageError subclasses
            raise AssertionError(f"README: raybone {' '.join(words)}: {err}") from None
    with pytest.raises(AssertionError, match="No such option: --bogus"):  # the check itself can fail
        try:
            group.get_command(typer.Context(group), "predict").make_context("raybone", ["m/", "x.png", "--bogus"])
        except Exception as err:
            raise AssertionError(str(err)) from None
