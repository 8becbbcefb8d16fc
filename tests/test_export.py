"""`raybone best` and its model folder, from a real (tiny) search on a real local Ray cluster."""

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
import yaml
from conftest import QUICK, chosen_row
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

import raybone.modelfolder.export
from raybone.cli import app
from raybone.core.augment import test_crops
from raybone.core.checkpoint import read_checkpoint
from raybone.core.model import create_model
from raybone.data import load_prepared
from raybone.errors import RayboneError
from raybone.experiments import Experiment, load_trained_model
from raybone.modelfolder.export import export_model
from raybone.spec import load_spec

FILES = {"weights.safetensors", "model.ts", "model.onnx", "model.json", "README.md", ".raybone.json"}
runner = CliRunner()


@pytest.fixture(scope="module")
def experiment(tiny_experiment):
    return tiny_experiment


@pytest.fixture(scope="module")
def exported(experiment, tmp_path_factory):
    """Export through the command line, over a model folder an earlier raybone (without the marker) wrote."""
    results, _ = experiment
    model = tmp_path_factory.mktemp("export") / "model"
    model.mkdir()
    (model / "model.json").write_text(json.dumps({"format": "raybone-model"}))
    (model / "model.ts").write_text("from an older export")
    result = runner.invoke(app, ["best", "tiny", "--results-dir", str(results), "--export", str(model)])
    assert result.exit_code == 0, result.output
    return model, result.output


@pytest.fixture(scope="module")
def checkpoint_model(experiment):
    row = chosen_row(experiment[0])
    return row, *load_trained_model(row.checkpoint_path)


@pytest.fixture(scope="module")
def val_crops(experiment, checkpoint_model):
    """30 test-time crops of five validation images (not the traced batch of 6) and the checkpoint's
    probabilities for them: what every exported graph must reproduce."""
    environment = json.loads((experiment[1].path / "environment.json").read_text())
    data = load_prepared(environment["data_path"])
    _, network, cfg, _ = checkpoint_model
    crops = test_crops(torch.from_numpy(data.images[~data.is_train][:5]), cfg.input_size).flatten(0, 1)
    with torch.no_grad():
        return crops, network(crops).softmax(-1).numpy()


def test_export_writes_the_whole_folder_and_replaces_the_old_one(exported):
    model, output = exported
    assert {p.name for p in model.iterdir()} == FILES
    assert json.loads((model / ".raybone.json").read_text())["files"] == sorted(FILES - {".raybone.json"})
    assert not [p.name for p in model.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert f"exported: {model}" in output
    card = (model / "README.md").read_text()
    assert "not a medical device" in card and "0.46" in card and "0.65" in card and "synthetic phantom" in card


def test_best_prints_the_trial_with_its_config_and_metrics(experiment, exported):
    _, output = exported
    best = chosen_row(experiment[0])
    assert (
        f"best trial {best.trial_id} by val_rmse (min) in tiny, its best checkpoint, iteration {best.iteration}"
        in output
    )
    for field in ("googlenet", "input_size", "decay_steps", "val_top1", "val_rmse_expected"):
        assert field in output


def test_model_json_describes_model_preprocessing_and_provenance(experiment, exported, checkpoint_model):
    _, outcome = experiment
    model, _ = exported
    row, _, cfg, num_classes = checkpoint_model
    meta = json.loads((model / "model.json").read_text())
    environment = json.loads((outcome.path / "environment.json").read_text())
    assert meta["format"] == "raybone-model" and meta["model"] == "googlenet"
    assert meta["classes"] == list(range(20)) and meta["num_classes"] == num_classes == 20
    assert meta["input_size"] == 32 and meta["image_size"] == 40 and meta["resize_to"] == cfg.resize_to
    assert meta["train_config"] == cfg.model_dump()
    assert meta["hyperparameters"] == {
        name: pytest.approx(row[name]) for name in ("lr", "decay_steps", "l2_weight", "weight_decay")
    }
    for name in ("val_top1", "val_top2", "val_rmse", "val_mae", "val_rmse_expected", "val_mae_expected"):
        assert meta["metrics"][name] == pytest.approx(row[name], abs=1e-12)
    assert meta["data"]["fingerprint"] == environment["data_fingerprint"]
    for identity in ("images_sha256", "content_sha256"):  # what evaluate recognises a copied source by
        assert meta["data"][identity] == environment["data_meta"][identity]
    assert meta["data"]["seed"] == 0 and meta["data"]["val_fraction"] == 0.25
    assert meta["packages"] == environment["packages"] and meta["export_packages"]["onnxruntime"]
    assert meta["experiment"] == "tiny" and meta["trial_id"] == row.trial_id
    assert len(meta["preprocessing"]["crops"]["order"]) == 6
    assert meta["preprocessing"]["network_input"]["shape"] == ["batch", 1, 32, 32]


def test_torchscript_and_onnx_give_the_checkpoint_models_probabilities(exported, val_crops):
    model, _ = exported
    crops, expected = val_crops
    with torch.no_grad():
        traced = torch.jit.load(str(model / "model.ts"))(crops).softmax(-1).numpy()
    onnx = _onnx_probabilities(model, crops)
    assert expected.shape == traced.shape == onnx.shape == (30, 20)
    np.testing.assert_allclose(traced, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx, expected, atol=1e-4, rtol=0)


def _raise_after_a_graph_dump(path: str) -> None:
    os.write(1, b"Torch IR graph at exception: graph(...)\n")  # as PyTorch's C++ logger does on fd 1
    raise RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d")


def _write_an_unreadable_file(path: str) -> None:
    Path(path).write_bytes(b"not an ONNX graph")


@pytest.mark.parametrize("failure", [_raise_after_a_graph_dump, _write_an_unreadable_file])
def test_onnx_falls_back_to_the_torch_export_exporter_where_the_torchscript_one_fails(
    experiment, exported, val_crops, tmp_path, monkeypatch, capfd, failure
):
    assert json.loads((exported[0] / "model.json").read_text())["onnx_exporter"] == "torchscript"
    export = torch.onnx.export

    def failing_torchscript_exporter(model, args, f, *, dynamo, **kwargs):
        return failure(f) if not dynamo else export(model, args, f, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", failing_torchscript_exporter)
    capfd.readouterr()
    model = export_model(Experiment.open(experiment[0], "tiny").best(), tmp_path / "model")
    os.write(1, b"stdout is back\n")
    assert capfd.readouterr().out == "stdout is back\n"
    assert json.loads((model / "model.json").read_text())["onnx_exporter"] == "torch.export"
    crops, expected = val_crops
    np.testing.assert_allclose(_onnx_probabilities(model, crops), expected, atol=1e-4, rtol=0)


def _onnx_probabilities(model: Path, crops: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"crops": crops.numpy()})
    return torch.from_numpy(logits).softmax(-1).numpy()


def test_weights_are_plain_safetensors_equal_to_the_checkpoint(exported, checkpoint_model):
    model, _ = exported
    _, network, _, _ = checkpoint_model
    path = model / "weights.safetensors"
    raw = path.read_bytes()
    assert not zipfile.is_zipfile(path)  # torch.save writes a zip of pickles; this must not be one
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    assert header["__metadata__"]["format"] == "raybone-model"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert max(v["data_offsets"][1] for v in tensors.values()) == len(raw) - 8 - header_size  # nothing else inside
    state = network.state_dict()
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(state)
        for name in state:
            assert torch.equal(f.get_tensor(name), state[name]), name


def test_failed_export_leaves_the_previous_folder_untouched(experiment, exported, tmp_path, monkeypatch):
    results, _ = experiment
    model, _ = exported
    target = tmp_path / "model"
    shutil.copytree(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(raybone.modelfolder.export, "TOLERANCE", 0.0)  # no export can agree that closely
    with pytest.raises(RayboneError, match="TorchScript export disagrees with PyTorch: class probabilities differ"):
        export_model(Experiment.open(results, "tiny").best(), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_export_refuses_to_replace_a_folder_that_is_not_a_model(experiment, tmp_path):
    results, _ = experiment
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["best", "--results-dir", str(results), "--export", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path}: exists and was not written by raybone (it holds notes.txt)" in result.stderr
    assert result.stdout == ""  # refused first: the best trial's table above the refusal read like a success
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_best_by_another_metric_and_the_most_recent_experiment(experiment):
    results, outcome = experiment
    by_top1 = Experiment.open(results).best(metric="val_top1", scope="last")
    assert by_top1.mode == "max" and by_top1.row.val_top1 == outcome.trials.val_top1.max()
    worst = Experiment.open(results, "tiny").best(metric="val_rmse", mode="max", scope="last")
    assert worst.row.val_rmse == outcome.trials.val_rmse.max()
    later = results / "later"
    later.mkdir()
    shutil.copy(outcome.path / "spec.yaml", later)
    pd.read_parquet(outcome.path / "trials.parquet").to_parquet(later / "trials.parquet")
    try:
        assert Experiment.open(results).name == "later"
    finally:
        shutil.rmtree(later)


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "no experiment named 'nope'"),
        (["tiny", "--metric", "accuracy"], "unknown metric 'accuracy'"),
        (["tiny", "--mode", "up"], "unknown mode 'up'"),
    ],
)
def test_best_usage_errors_are_one_line(experiment, args, message):
    results, _ = experiment
    result = runner.invoke(app, ["best", *args, "--results-dir", str(results)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_best_without_experiments_says_so(tmp_path):
    result = runner.invoke(app, ["best", "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no experiments in" in result.output


def test_a_moved_or_copied_experiment_reads_its_own_checkpoints(tmp_path):
    copy = Experiment(tmp_path / "copy", "tiny")
    (copy.location / "train" / "trial-1" / "checkpoint_0").mkdir(parents=True)
    moved = copy.resolve("/elsewhere/results/tiny/train/trial-1/checkpoint_0")
    assert moved == copy.location / "train" / "trial-1" / "checkpoint_0"
    original = tmp_path / "tiny" / "train" / "trial-1" / "checkpoint_0"
    original.mkdir(parents=True)  # the original still exists: the copy reads its own all the same
    assert copy.resolve(str(original)) == copy.location / "train" / "trial-1" / "checkpoint_0"


def _copied_to_a_bucket(results: Path, bucket: Path) -> Path:
    """The tiny experiment as a search on a file:// storage leaves it: checkpoint paths in both tables are URIs."""
    shutil.copytree(results / "tiny", bucket / "tiny", ignore=shutil.ignore_patterns("report"))
    for table, columns in (
        ("trials.parquet", ["checkpoint_path", "best_checkpoint_path"]),
        ("history.parquet", ["checkpoint_path", "restored_from"]),
    ):
        frame = pd.read_parquet(bucket / "tiny" / table)
        for column in columns:
            frame[column] = [
                f"file://{bucket}/tiny/{Path(p).relative_to(results / 'tiny')}" if isinstance(p, str) else None
                for p in frame[column]
            ]
        frame.to_parquet(bucket / "tiny" / table)
    return bucket


def test_export_reads_an_experiment_on_uri_storage(experiment, tmp_path, monkeypatch):
    """A file:// URI takes pyarrow's path, as s3:// and gs:// do: the tables and only the best checkpoint are
    mirrored into the cache, and the exported model is the one the local experiment exports."""
    results, _ = experiment
    bucket = _copied_to_a_bucket(results, tmp_path / "bucket")
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))

    best = Experiment.open(f"file://{bucket}", "tiny").best()
    model = export_model(best, tmp_path / "model")

    local = best.experiment.local()
    assert local.is_relative_to(tmp_path / "cache") and local.name == "tiny"
    mirrored = {p.parent.name for p in (tmp_path / "cache").rglob("checkpoint.pt")}
    chosen = chosen_row(results)
    assert mirrored == {Path(chosen.checkpoint_path).name}  # the other checkpoints stay remote
    meta = json.loads((model / "model.json").read_text())
    assert meta["trial_id"] == chosen.trial_id
    with safe_open(model / "weights.safetensors", "pt") as weights:
        state = read_checkpoint(chosen.checkpoint_path)
        assert all(torch.equal(weights.get_tensor(k), v) for k, v in state["model"].items())


def test_a_model_with_sex_input_exports_with_a_sex_input(tmp_path):
    """A checkpoint of a sex-conditioned model, written as a trial writes it (no search needed)."""
    spec = load_spec(QUICK, ["data.image_size=40", "input_size=32", "sex_input=true"])
    experiment, checkpoint = tmp_path / "results" / "sexed", tmp_path / "results" / "sexed" / "train" / "t" / "c"
    checkpoint.mkdir(parents=True)
    (experiment / "spec.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
    (experiment / "environment.json").write_text(json.dumps({"data_meta": {"image_size": 40}}))
    searched = {"lr": 1e-3, "decay_steps": 50, "l2_weight": 0.1, "weight_decay": 0.01}
    cfg = spec.train_config(searched)
    network = create_model(cfg.model, 20, sex_input=True)
    with torch.no_grad():
        network.head.weight[:, -1].normal_()  # trained models use the sex column; a fresh one ignores it
    torch.save(
        {"model": network.state_dict(), "config": cfg.model_dump(), "num_classes": 20, "iteration": 1},
        checkpoint / "checkpoint.pt",
    )
    pd.DataFrame(
        [{"trial_id": "t", "status": "completed", **searched, "val_rmse": 1.0, "checkpoint_path": str(checkpoint)}]
    ).to_parquet(experiment / "trials.parquet")

    model = export_model(
        Experiment.open(tmp_path / "results").best(), tmp_path / "model"
    )  # checks TorchScript and ONNX itself
    meta = json.loads((model / "model.json").read_text())
    assert meta["sex_input"] and meta["preprocessing"]["network_sex_input"]["name"] == "sex"
    session = onnxruntime.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["crops", "sex"]
    crops = test_crops(torch.randint(0, 256, (2, 37, 37), dtype=torch.uint8), 32).flatten(0, 1)
    male, female = (
        session.run(["logits"], {"crops": crops.numpy(), "sex": np.full(12, s, np.float32)})[0] for s in (1.0, -1.0)
    )
    assert np.abs(male - female).max() > 1e-3

    radiograph = tmp_path / "hand.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 50), dtype=np.uint8)).save(radiograph)
    needs_sex = CliRunner().invoke(app, ["predict", str(model), str(radiograph)])
    assert needs_sex.exit_code == 2 and "takes the patient's sex as an input; pass --sex" in needs_sex.output
    (tmp_path / "sex.csv").write_text("file,sex\nhand.png,F\n")
    runs = {
        how: CliRunner().invoke(app, ["predict", str(model), str(radiograph), "--format", "json", *how])
        for how in (("--sex", "male"), ("--sex", "female"), ("--sex-csv", str(tmp_path / "sex.csv")))
    }
    probs = {how[-1]: json.loads(run.stdout)[0]["probabilities"] for how, run in runs.items()}
    assert probs["male"] != probs["female"] and probs[str(tmp_path / "sex.csv")] == probs["female"]


def test_every_reading_command_works_on_a_file_uri(experiment, tmp_path, monkeypatch):
    """results, --list, best, --export, report and evaluate read a file:// storage through the same pyarrow layer
    that serves s3:// and gs:// (the experiment is copied as a search on a URI storage leaves it)."""
    results, _ = experiment
    bucket = _copied_to_a_bucket(results, tmp_path / "bucket")
    outcome = chosen_row(results)
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    storage = ["--results-dir", f"file://{bucket}"]

    ranked = runner.invoke(app, ["results", "tiny", "--format", "json", *storage])
    assert ranked.exit_code == 0, ranked.output
    assert next(r["trial_id"] for r in json.loads(ranked.stdout)) == outcome.trial_id
    listed = runner.invoke(app, ["results", "--list", "--format", "json", *storage])
    assert listed.exit_code == 0 and [r["name"] for r in json.loads(listed.stdout)] == ["tiny"]
    table = runner.invoke(app, ["results", *storage])
    assert table.exit_code == 0 and "hyperparameter importances" in table.stdout, table.output
    best = runner.invoke(app, ["best", *storage, "--export", str(tmp_path / "model")])
    assert best.exit_code == 0 and outcome.trial_id in best.stdout, best.output
    report = runner.invoke(app, ["report", *storage, "--samples", "2"])
    assert report.exit_code == 0 and (tmp_path / "report-tiny" / "index.html").is_file(), report.output
    data_path = json.loads((bucket / "tiny" / "environment.json").read_text())["data_path"]
    evaluated = runner.invoke(app, ["evaluate", str(tmp_path / "model"), "--data", data_path, "--json", "e.json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "e.json").read_text())["trial_id"] == outcome.trial_id


def test_best_takes_the_best_checkpoint_any_trial_kept_and_scope_last_the_old_choice(experiment):
    results, outcome = experiment
    history = pd.read_parquet(outcome.path / "history.parquet")
    history["trial_index"] = history.trial_id.map(outcome.trials.set_index("trial_id").trial_index)
    # equal scores: the trial started first, and of its equal reports the latest
    best_report = history.sort_values(["val_rmse", "trial_index", "iteration"], ascending=[True, True, False]).iloc[0]
    best = Experiment.open(results, "tiny").best()
    assert best.scope == "best" and best.trial_id == best_report.trial_id
    assert best.iteration == best_report.iteration and best.metrics()["val_rmse"] == best_report.val_rmse
    assert best.checkpoint_dir() == Path(best_report.checkpoint_path)
    shown = runner.invoke(app, ["best", "tiny", "--results-dir", str(results)])
    assert f"its best checkpoint, iteration {best_report.iteration}" in shown.stdout, shown.output
    last = Experiment.open(results, "tiny").best(scope="last")
    final = outcome.trials.sort_values(["val_rmse", "trial_index"]).iloc[0]
    assert last.trial_id == final.trial_id and last.iteration == final.iteration
    shown = runner.invoke(app, ["best", "tiny", "--scope", "last", "--results-dir", str(results)])
    assert f"its last checkpoint, iteration {final.iteration}" in shown.stdout, shown.output


def test_trials_with_equal_scores_are_ranked_alike_by_results_best_and_the_search(experiment, tmp_path):
    """Early in a search several models predict one class and score alike: `results` ranked the trial Tune started
    first on top, while `best --export` and the search's summary took whichever came first in a table."""
    from raybone.experiments.experiment import best_row

    _, outcome = experiment
    copy = shutil.copytree(outcome.path, tmp_path / "tiny")
    trials = pd.read_parquet(copy / "trials.parquet")
    trials = trials.assign(val_rmse=3.0, best_val_rmse=3.0).sort_values("trial_index", ascending=False)  # last first
    trials.to_parquet(copy / "trials.parquet")
    first = trials.sort_values("trial_index").trial_id.tolist()
    # The trial started first reached 3.0 at its first report, the others at their last (then it got worse).
    history = pd.read_parquet(copy / "history.parquet").iloc[::-1]
    early = (history.trial_id == first[0]) & (history.iteration == history.iteration.min())
    late = (history.trial_id != first[0]) & (history.iteration == history.iteration.max())
    history["val_rmse"] = 4.0
    history.loc[early | late, "val_rmse"] = 3.0
    history.to_parquet(copy / "history.parquet")

    tied = Experiment.open(tmp_path, "tiny")
    assert tied.ranked().trial_id.tolist() == first
    assert tied.best().trial_id == first[0] and tied.best().iteration == history.iteration.min()
    assert tied.best(scope="last").trial_id == first[0]
    assert [member.trial_id for member in tied.top(2)] == first[:2]
    assert best_row(trials, "best_val_rmse", "min").trial_id == first[0]  # what `raybone search` prints as best
    shown = runner.invoke(app, ["best", "tiny", "--results-dir", str(tmp_path)])
    assert shown.exit_code == 0 and [t for t in first if t in shown.stdout] == first[:1], shown.output


@pytest.fixture(scope="module")
def ensemble(experiment, tmp_path_factory):
    results, _ = experiment
    folder = tmp_path_factory.mktemp("ensemble") / "model"
    result = runner.invoke(app, ["best", "tiny", "--results-dir", str(results), "--export", str(folder), "--top", "2"])
    assert result.exit_code == 0, result.output
    return folder, result.stdout


def test_an_ensemble_of_the_top_trials_is_one_model_folder(experiment, ensemble):
    results, _ = experiment
    folder, output = ensemble
    meta = json.loads((folder / "model.json").read_text())
    members = Experiment.open(results, "tiny").top(2)
    assert meta["kind"] == "ensemble" and [m["trial_id"] for m in meta["members"]] == [m.trial_id for m in members]
    assert [m["trial_id"] for m in meta["members"]] == Experiment.open(results, "tiny").ranked().trial_id[:2].tolist()
    for index, member in enumerate(members, start=1):
        assert {"weights.safetensors", "model.ts", "model.onnx"} <= {
            p.name for p in (folder / f"member-{index}").iterdir()
        }
        assert meta["members"][index - 1]["iteration"] == member.iteration
        assert f"member {index}: trial {member.trial_id}, iteration {member.iteration}" in output
    card = (folder / "README.md").read_text()
    assert "an ensemble of 2 trials" in card and all(m.trial_id in card for m in members)
    worse = meta["metrics"]["val_rmse"] > members[0].metrics()["val_rmse"]
    assert ("is worse than its best member's alone" in output) == worse, output


@pytest.mark.parametrize(
    ("metric", "mode", "together", "warned"),
    [
        ("val_rmse", "min", 2.46, True),
        ("val_rmse", "min", 2.10, False),
        ("val_top1", "max", 0.17, True),
        ("val_top1", "max", 0.30, False),
        ("val_kappa", "max", None, False),  # a metric the ensemble's model.json does not hold
    ],
)
def test_an_ensemble_worse_than_its_best_member_is_noted(tmp_path, capsys, metric, mode, together, warned):
    from raybone.cli import _warn_if_worse_than_alone

    (tmp_path / "model.json").write_text(json.dumps({"metrics": {} if together is None else {metric: together}}))
    best = SimpleNamespace(metric=metric, mode=mode, metrics=lambda: {metric: 2.19 if mode == "min" else 0.22})
    _warn_if_worse_than_alone(tmp_path, best)
    assert ("is worse than its best member's alone" in capsys.readouterr().out) == warned


@pytest.mark.parametrize(
    ("status", "ended", "noted"),
    [("stopped_early", 1250, True), ("completed", 1500, False), ("running", 750, False), ("error", 750, False)],
)
def test_a_member_whose_trial_a_scheduler_stopped_says_so(status, ended, noted):
    from raybone.cli import _member_line

    member = SimpleNamespace(
        row=pd.Series({"iteration": ended, "status": status}),
        train_config=lambda: SimpleNamespace(iterations=1500),
        trial_id="abc123",
        iteration=500,  # its best checkpoint's, before the end in every case
        metric="val_rmse",
        metrics=lambda: {"val_rmse": 2.0004},
    )
    line = _member_line(2, member)
    assert line.startswith("member 2: trial abc123, iteration 500, val_rmse 2")
    assert ("its trial stopped at 1,250 of 1,500 iterations" in line) == noted, line
    assert ("stopped" in line) == noted, line


def test_an_ensemble_predicts_and_evaluates_with_its_members_probabilities_averaged(experiment, ensemble, tmp_path):
    from raybone.core.engine import predict_trained
    from raybone.modelfolder.predict import Predictor, evaluate

    results, outcome = experiment
    folder, _ = ensemble
    data = load_prepared(json.loads((outcome.path / "environment.json").read_text())["data_path"])
    images = data.images[~data.is_train][:6]
    members = Experiment.open(results, "tiny").top(2)
    each = [predict_trained(*m.load_model()[:2], images, np.full(6, -1), "cpu") for m in members]
    np.testing.assert_allclose(Predictor(folder).predict_arrays(images), np.mean(each, axis=0), atol=1e-6)
    for index in (1, 2):  # each member's ONNX file runs on its own
        session = onnxruntime.InferenceSession(str(folder / f"member-{index}" / "model.onnx"))
        crops = test_crops(torch.from_numpy(images[:1]), 32).flatten(0, 1).numpy()
        assert session.run(["logits"], {"crops": crops})[0].shape == (6, 20)
    evaluation = evaluate(folder, str(data.path))
    meta = json.loads((folder / "model.json").read_text())
    assert evaluation["metrics"]["rmse"] == pytest.approx(meta["metrics"]["val_rmse"], abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top", "0"], "--top 0: name at least one trial"),
        (["--top", "5"], "--top 5: only 4 trials of 'tiny' kept a checkpoint with val_rmse"),
        (["--top", "2", "--from-top", "1"], "--from-top 1 must be at least --top 2"),
    ],
)
def test_impossible_ensembles_are_one_line_and_write_nothing(experiment, tmp_path, args, message):
    results, _ = experiment
    result = runner.invoke(app, ["best", "tiny", "--results-dir", str(results), "--export", str(tmp_path / "m"), *args])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.output
    assert not (tmp_path / "m").exists()
