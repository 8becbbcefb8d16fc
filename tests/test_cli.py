"""The `raybone` command as a user types it."""

import os
import subprocess
import sys

import pandas as pd
from conftest import TINY
from typer.testing import CliRunner

import raybone
from raybone.cli import app

runner = CliRunner()


def test_data_prepare_reports_every_usable_real_radiograph(shared_data, tmp_path):
    result = runner.invoke(
        app, ["data", "prepare", str(shared_data / "rsna-raw"), "--out", str(tmp_path / "raw"), "--image-size", "48"]
    )
    assert result.exit_code == 0, result.output
    assert "300 usable" in result.output
    assert (tmp_path / "raw" / "manifest.parquet").is_file()


def test_bad_search_space_is_one_line_and_exit_2(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("train:\n  model: resnet9\n")
    result = runner.invoke(app, ["search", "--config", str(space)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {space}: train: model: unknown model 'resnet9'; choose one of vgg16, googlenet"]


def test_bad_override_is_rejected_before_ray_starts(tmp_path):
    result = runner.invoke(app, ["search", "--set", "lr.high=1e-9", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "train: lr: low (0.0001) must be below high (1e-09)" in result.output
    assert not any(tmp_path.iterdir())


def test_missing_data_source_is_named(tmp_path):
    result = runner.invoke(app, ["data", "prepare", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "nowhere" in result.output and "Traceback" not in result.output


def test_a_search_in_which_no_trial_reports_exits_1_and_names_the_error(tmp_path):
    """A script or CI job running a search must not take one that found nothing for a success (it exited 0). Each
    failed try is one line, not Ray's traceback (about 45 lines a try), and `raybone results` names the error."""
    weights = tmp_path / "missing.pt"
    settings = [*TINY, "num_samples=1", "scheduler.type=none", "resources.max_failures=0", f"weights={weights}"]
    result = subprocess.run(
        [sys.executable, "-m", "raybone", "search", "--name", "broken", "--results-dir", str(tmp_path / "results")]
        + [arg for setting in settings for arg in ("--set", setting)],
        capture_output=True,
        text=True,
        env={**os.environ, "RAYBONE_CACHE": str(tmp_path / "cache"), "COLUMNS": "1000"},
        timeout=600,
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error: no trial of broken reported a result; 1 of 1 failed (errors above)" in result.stderr.splitlines()
    assert f"failed: cannot read weights file {weights}" in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    (row,) = pd.read_parquet(tmp_path / "results" / "broken" / "trials.parquet").itertuples()
    assert row.status == "error" and row.error.startswith(f"cannot read weights file {weights}")
    shown = runner.invoke(
        app, ["results", "broken", "--results-dir", str(tmp_path / "results")], env={"COLUMNS": "1000"}
    )
    assert shown.exit_code == 0, shown.output
    resume = f"raybone search --resume broken --storage {tmp_path / 'results'} tries them again"
    assert f"1 of 1 trials failed ({resume}):" in shown.output
    assert f"  {row.trial_id}: cannot read weights file {weights}" in shown.output


def test_a_search_stopped_before_any_report_says_how_to_continue_it():
    from raybone.cli import _unscored

    trials = pd.DataFrame({"status": ["error", "running", "running"]})
    assert (
        _unscored(trials, "x") == "1 of 3 failed (errors above), 2 unfinished: raybone search --resume x continues them"
    )
    assert _unscored(pd.DataFrame(), "x") == "0 of 0 failed (errors above)"


def test_the_version_and_what_raybone_is_are_one_command_away():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output == f"raybone {raybone.__version__}\n"
    assert "Find the best fine-tuned CNN for bone age" in runner.invoke(app, ["--help"]).output


def test_listing_no_experiments_says_so(tmp_path):
    """An empty table, exit 0, read like a listing of experiments that had vanished."""
    listed = runner.invoke(app, ["results", "--list", "--results-dir", str(tmp_path / "results")])
    assert (
        listed.exit_code == 0 and "no experiments in" in listed.output and "run `raybone search` first" in listed.output
    )
    as_json = runner.invoke(app, ["results", "--list", "--format", "json", "--results-dir", str(tmp_path / "results")])
    assert as_json.exit_code == 0 and as_json.stdout.strip() == "[]"
