"""`raybone predict` and `raybone evaluate` on a model exported from a real (tiny) search."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import chosen_row, write_dicom
from PIL import Image
from typer.testing import CliRunner

from raybone.cli import app
from raybone.core.engine import predict_probs, resize
from raybone.data import render_hand, warp_image
from raybone.errors import RayboneError
from raybone.experiments import load_trained_model
from raybone.modelfolder.predict import Predictor, evaluate, find_images

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def best_row(tiny_experiment):
    return chosen_row(tiny_experiment[0])


@pytest.fixture(scope="module")
def hand():
    """A non-square 8-bit radiograph using the full 0..255 range (so DICOM scaling keeps every value)."""
    pixels = render_hand(130.0, True, np.random.default_rng(7), 160)[:, 16:144].astype(np.float64)
    return np.rint((pixels - pixels.min()) * 255 / (pixels.max() - pixels.min())).astype(np.uint8)


def _write_formats(folder: Path, grey: np.ndarray) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey).save(folder / "hand.png")
    Image.fromarray(grey).save(folder / "hand.jpg", quality=100)
    # 12-bit detector values; MONOCHROME1 stores them inverted (bone dark).
    write_dicom(folder / "mono2.dcm", grey.astype(np.uint16) * 16)
    write_dicom(folder / "mono1.dcm", (255 - grey.astype(np.uint16)) * 16, photometric="MONOCHROME1")
    return {name: folder / name for name in ("hand.png", "hand.jpg", "mono2.dcm", "mono1.dcm")}


def _json_output(result) -> list[dict]:
    return json.loads(result.stdout)


def test_every_format_of_the_same_pixels_gets_the_checkpoints_prediction(
    tiny_experiment, model, best_row, hand, tmp_path
):
    files = _write_formats(tmp_path / "in", hand)
    # The reference: the trial's own checkpoint, through the training code's resize and six-crop evaluation.
    network, cfg, _ = load_trained_model(best_row.checkpoint_path)
    warped = resize(torch.from_numpy(np.array(warp_image(hand, 40)[None])), cfg.resize_to)
    reference = predict_probs(network, warped, cfg.input_size, 8, torch.device("cpu"))[0]

    result = runner.invoke(app, ["predict", str(model), *map(str, files.values()), "--format", "json"])
    assert result.exit_code == 0, result.output
    records = {Path(r["file"]).name: r for r in _json_output(result)}
    assert set(records) == set(files)
    for name, record in records.items():
        probs = np.array(record["probabilities"])
        tolerance = 2e-3 if name.endswith(".jpg") else 1e-5  # JPEG at quality 100 is still lossy
        np.testing.assert_allclose(probs, reference, atol=tolerance, rtol=0, err_msg=name)
        assert probs.sum() == pytest.approx(1, abs=1e-5)
        # The same top-2 classes, up to ties closer than the tolerance.
        first, second = np.sort(reference)[::-1][:2]
        assert reference[record["predicted_years"]] >= first - tolerance
        assert reference[record["second_years"]] >= second - tolerance
        assert record["predicted_years"] != record["second_years"]
        expected = float(reference @ np.arange(20))
        assert record["expected_age_years"] == pytest.approx(expected, abs=20 * tolerance)
        assert record["expected_age_months"] == pytest.approx(record["expected_age_years"] * 12)


def test_bad_files_are_reported_one_line_each_and_the_rest_predicted(model, hand, tmp_path):
    folder = tmp_path / "mixed"
    good = _write_formats(folder / "scans", hand)
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")
    (folder / "text.png").write_text("this is not a PNG")
    (folder / "empty.jpg").write_bytes(b"")
    write_dicom(folder / "header-only.dcm", hand.astype(np.uint16), pixel_data="none")

    result = runner.invoke(app, ["predict", str(model), str(folder), "--format", "json", "--batch-size", "2"])
    assert result.exit_code == 1
    assert sorted(r["file"] for r in _json_output(result)) == sorted(map(str, good.values()))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(lines) - len(errors) == 1  # the demo-atlas warning, once
    assert sorted(errors) == sorted(
        [
            f"error: {folder / 'empty.jpg'}: file is empty (0 bytes)",
            f"error: {folder / 'header-only.dcm'}: DICOM file has no pixel data",
            f"error: {folder / 'text.png'}: not a readable PNG, JPEG or DICOM image",
        ]
    )


def test_csv_and_table_output(model, hand, tmp_path, monkeypatch):
    files = _write_formats(tmp_path / "in", hand)
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "in"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns[:5]) == [
        "file",
        "predicted_years",
        "second_years",
        "expected_age_years",
        "expected_age_months",
    ]
    assert list(table.columns[5:]) == [f"p_{j}" for j in range(20)]
    assert sorted(table.file) == sorted(map(str, files.values()))
    np.testing.assert_allclose(table.filter(like="p_").sum(axis=1), 1, atol=1e-5)
    monkeypatch.chdir(tmp_path)  # a short path, so the table does not wrap it
    shown = runner.invoke(app, ["predict", str(model), "in/hand.png"])
    assert shown.exit_code == 0 and "in/hand.png" in shown.stdout and "expected age" in shown.stdout
    assert "note:" not in shown.stderr
    told = runner.invoke(app, ["predict", str(model), "in/hand.png", "--sex", "female"])  # taken silently before
    assert told.exit_code == 0 and "takes no sex input; --sex and --sex-csv change nothing" in told.stderr


def test_predictor_loads_without_unpickling_and_matches_the_checkpoint(model, best_row, monkeypatch):
    network, _, _ = load_trained_model(best_row.checkpoint_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder must load without torch.load")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", refuse)
        predictor = Predictor(model, backend="torch")
    assert predictor.image_size == 40 and predictor.input_size == 32 and predictor.num_classes == 20
    for name, tensor in network.state_dict().items():
        assert torch.equal(predictor.model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere", "x.png"], "nowhere: no such model folder"),
        ([".", "x.png"], "not a raybone model folder (model.json missing)"),
    ],
)
def test_missing_model_folder_is_a_usage_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_evaluate_reproduces_the_trials_validation_metrics(tiny_experiment, model, best_row, tmp_path):
    _, outcome = tiny_experiment
    data_path = json.loads((outcome.path / "environment.json").read_text())["data_path"]
    out = tmp_path / "evaluation.json"
    result = runner.invoke(app, ["evaluate", str(model), "--data", data_path, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "RMSE" in result.stdout and "confusion matrix" in result.stdout
    evaluation = json.loads(out.read_text())
    assert evaluation["split"] == "val" and evaluation["same_data_as_training"]
    assert evaluation["warning"] is None and "warning" not in result.output  # the atlas, on the atlas
    assert evaluation["images"] == 160 and evaluation["trial_id"] == best_row.trial_id
    metrics = evaluation["metrics"]
    for name in (
        "top1",
        "top2",
        "rmse",
        "mae",
        "rmse_expected",
        "mae_expected",
        "rmse_argmax",
        "mae_argmax",
        "mae_months",
    ):
        if f"val_{name}" in best_row:
            assert metrics[name] == pytest.approx(best_row[f"val_{name}"], abs=1e-6), name
    assert metrics["rmse_months"] == pytest.approx(12 * metrics["rmse"])
    matrix = np.array(evaluation["confusion_matrix"])
    assert matrix.shape == (20, 20) and matrix.sum() == 160
    assert np.trace(matrix) / 160 == pytest.approx(metrics["top1"])


def test_evaluate_recognises_the_training_source(model, best_row):
    # The demo source, prepared again with the model's settings, is the data the model was trained on.
    again = evaluate(model, "demo")
    assert again["split"] == "val" and again["same_data_as_training"] and again["images"] == 160
    assert again["metrics"]["rmse"] == pytest.approx(best_row.val_rmse, abs=1e-6)


def test_evaluate_recognises_a_copy_of_the_training_source(model, best_row, tmp_path, monkeypatch):
    # Copied with new file dates: prepared again under another fingerprint, yet the same data.
    source = Path(json.loads((model / "model.json").read_text())["data"]["source"])
    copy = shutil.copytree(source, tmp_path / "copy", copy_function=shutil.copyfile)
    for image in copy.rglob("*.png"):
        os.utime(image, ns=(1, 1))
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))
    again = evaluate(model, str(copy))
    assert again["fingerprint"] != json.loads((model / "model.json").read_text())["data"]["fingerprint"]
    assert again["split"] == "val" and again["same_data_as_training"] and again["images"] == 160
    assert again["metrics"]["rmse"] == pytest.approx(best_row.val_rmse, abs=1e-6)


def test_evaluate_on_other_data_takes_all_of_it_by_default(model, hand, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "other"
    (source / "images").mkdir(parents=True)
    ages = [30, 30, 90, 90, 150, 150, 200, 200]  # months
    for image_id, _ in enumerate(ages, start=1):
        Image.fromarray(np.roll(hand, 3 * image_id, axis=1)).save(source / "images" / f"{image_id}.png")
    pd.DataFrame({"id": range(1, 9), "boneage": ages, "male": [True, False] * 4}).to_csv(
        source / "boneage.csv", index=False
    )
    result = runner.invoke(app, ["evaluate", str(model), "--data", str(source), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    everything = json.loads((tmp_path / "e.json").read_text())
    assert everything["split"] == "all" and not everything["same_data_as_training"] and everything["images"] == 8
    # A model of the phantom atlas on radiographs: said on stderr and recorded, as predict says it.
    assert "was trained on the synthetic phantom demo atlas" in everything["warning"]
    assert f"\nwarning: {model} was trained on the synthetic phantom demo atlas" in result.stderr
    matrix = np.array(everything["confusion_matrix"])
    assert matrix.sum(axis=1)[[2, 7, 12, 16]].tolist() == [2, 2, 2, 2]  # rows are the true classes
    train = evaluate(model, str(source), split="train")
    assert train["split"] == "train" and train["images"] == 4  # one of each class is held out
    bad = runner.invoke(app, ["evaluate", str(model), "--data", str(source), "--split", "test"])
    assert bad.exit_code == 2 and "unknown split 'test'" in bad.output


def test_folders_are_searched_for_radiographs_only(tmp_path, hand):
    _write_formats(tmp_path / "a" / "b", hand)
    (tmp_path / "a" / "readme.txt").write_text("x")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    write_dicom(tmp_path / "a" / "no-extension", hand.astype(np.uint16))
    files, problems = find_images([tmp_path / "a", tmp_path / "missing.png"])
    assert sorted(p.name for p in files) == ["hand.jpg", "hand.png", "mono1.dcm", "mono2.dcm", "no-extension"]
    assert problems == [f"{tmp_path / 'missing.png'}: no such file or folder"]


def test_predicts_every_real_radiograph_in_a_folder(model, shared_data):
    runs = {
        backend: runner.invoke(
            app, ["predict", str(model), str(shared_data / "rsna-full"), "--format", "json", "--backend", backend]
        )
        for backend in ("onnx", "torch")
    }
    assert all(run.exit_code == 0 for run in runs.values()), runs["onnx"].stderr + runs["torch"].stderr
    records = _json_output(runs["onnx"])
    assert len(records) == len(list((shared_data / "rsna-full" / "images").glob("*.png")))
    assert all(0 <= r["predicted_years"] < 20 and abs(sum(r["probabilities"]) - 1) < 1e-5 for r in records)
    by_torch = {r["file"]: r["probabilities"] for r in _json_output(runs["torch"])}
    np.testing.assert_allclose([r["probabilities"] for r in records], [by_torch[r["file"]] for r in records], atol=1e-4)


def test_the_onnx_backend_gives_torchs_probabilities_without_loading_torch(model, hand, tmp_path):
    files = _write_formats(tmp_path / "in", hand)
    onnx, torch_ = Predictor(model), Predictor(model, backend="torch")
    assert (onnx.backend, torch_.backend) == ("onnx", "torch")
    assert onnx.sizes == [37]  # the tiny model re-warps 40 px to 37 before its 32 px crops
    images = np.stack([onnx.preprocess(f) for f in files.values()] + [np.full((40, 40), 9, np.uint8)])
    np.testing.assert_allclose(onnx.predict_arrays(images), torch_.predict_arrays(images), atol=1e-5, rtol=0)

    code = (
        "import sys; from raybone.cli import app; "
        f"app(['predict', {str(model)!r}, {str(tmp_path / 'in')!r}, '--format', 'json'], standalone_mode=False); "
        "print(sorted(m for m in ('torch', 'ray', 'optuna') if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == len(files) and result.stderr.splitlines()[-1] == "[]"


def test_the_onnx_backend_is_cpu_only(model):
    with pytest.raises(RayboneError, match="--backend onnx runs on the CPU; use --backend torch with --device cuda"):
        Predictor(model, device="cuda", backend="onnx")
