"""The `raybone` command as a user types it."""

from typer.testing import CliRunner

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
