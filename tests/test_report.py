"""`raybone report` on a real small search, and Grad-CAM on real networks."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from raybone.cli import app
from raybone.core.augment import test_crops
from raybone.core.metrics import median_predictor
from raybone.core.model import create_model
from raybone.core.saliency import grad_cam
from raybone.data.phantom import render_hand
from raybone.experiments import Experiment
from raybone.report import PAGE, write_report


def _figures(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_references_figures_that_exist(tiny_experiment, tmp_path):
    results, outcome = tiny_experiment
    steps = []
    folder = write_report(results, "tiny", tmp_path / "report", samples=4, on_step=lambda *step: steps.append(step))
    # The progress bar's steps: the re-run, then one per section of the page, each before its figure is drawn.
    assert [(done, total) for done, total, _ in steps] == [(n, 10) for n in range(10)]
    assert [what for _, _, what in steps][-3:] == ["worst errors", "class probabilities", "Grad-CAM"]
    page = (folder / PAGE).read_text()
    data = Experiment.open(results, "tiny").best().prepared_data()
    median = median_predictor(data.labels[data.is_train], data.labels[~data.is_train])
    assert f"always class {median['class']}, the training split's median" in page
    assert f"<td>{median['rmse']:.3g}</td>" in page
    # 4 iterations of the phantom atlas: the page says what it was trained on, and that it has not learned.
    assert "synthetic phantom demo atlas" in page and "This model has not learned" in page
    names = _figures(page)
    assert {
        "confusion.png",
        "learning_curves.png",
        "hyperparameters.png",
        "worst_errors.png",
        "probabilities.png",
        "gradcam.png",
        "optimisation_history.png",
        "parallel_coordinates.png",
    } <= set(names)
    headers = re.findall(r"<thead>(.*?)</thead>", page, flags=re.S)
    assert all(header.count("<tr") == 1 for header in headers)  # one header row, no empty second one
    assert all(re.search(r"<th>\s*</th>", header) is None for header in headers)  # no unnamed index column
    assert "<th>rank</th>" in page and "<th>model</th>" in page
    for name in names:
        with Image.open(folder / name) as png:  # a real, non-trivial picture, not an empty file
            assert png.format == "PNG" and min(png.size) > 200
            assert np.asarray(png.convert("L")).std() > 5
    for trial_id in outcome.trials.trial_id:  # the table of all trials
        assert trial_id in page
    assert "VGG16 (paper)" in page and str(outcome.best.trial_id) in page


def test_report_prepares_the_data_again_when_the_prepared_folder_is_gone(tiny_experiment, tmp_path):
    results, _ = tiny_experiment
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    environment = json.loads((copy / "tiny" / "environment.json").read_text())
    environment["data_path"] = str(tmp_path / "deleted")
    (copy / "tiny" / "environment.json").write_text(json.dumps(environment))

    folder = write_report(copy, "tiny", samples=2)  # default place: beside the experiment's tables

    assert folder == copy / "tiny" / "report"
    assert all((folder / name).stat().st_size > 0 for name in _figures((folder / PAGE).read_text()))


def test_the_data_of_a_search_given_relative_paths_is_found_from_another_folder(tiny_experiment, tmp_path, monkeypatch):
    """`--data prep` is recorded as given: a report run from another folder said 'prep: no such file or folder'."""
    results, _ = tiny_experiment
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    environment = json.loads((copy / "tiny" / "environment.json").read_text())
    searched = tmp_path / "searched"  # where the search ran, given `--data prep` (an earlier raybone kept it so)
    shutil.copytree(environment["data_path"], searched / "prep")
    shutil.copytree(environment["data_meta"]["source"], searched / "atlas")
    environment.update(cwd=str(searched), data_path="prep")
    (copy / "tiny" / "environment.json").write_text(json.dumps(environment))
    monkeypatch.chdir(tmp_path)

    assert Experiment.open(copy, "tiny").best().prepared_data().path == searched / "prep"
    (copy / "tiny" / "environment.json").write_text(json.dumps({**environment, "cwd": str(tmp_path / "gone")}))
    monkeypatch.chdir(searched)  # another machine with the same layout: the path as given, from here
    assert Experiment.open(copy, "tiny").best().prepared_data().path.resolve() == searched / "prep"
    (copy / "tiny" / "environment.json").write_text(json.dumps(environment))
    shutil.rmtree(searched / "prep")  # gone: prepared again from the source, given as `--data atlas`
    spec = copy / "tiny" / "spec.yaml"
    spec.write_text(spec.read_text().replace("source: demo", "source: atlas"))
    assert Experiment.open(copy, "tiny").best().prepared_data().meta["source"] == str(searched / "atlas")


@pytest.mark.parametrize("recorded", ["with content_sha256", "before content_sha256"])
def test_data_prepared_again_from_a_copied_source_is_still_the_experiments(tiny_experiment, recorded, tmp_path):
    """A copy of the source with new file dates changes the fingerprint, not what was prepared from it."""
    results, _ = tiny_experiment
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    environment = json.loads((copy / "tiny" / "environment.json").read_text())
    environment["data_fingerprint"] = environment["data_meta"]["fingerprint"] = "0" * 64
    if recorded == "before content_sha256":
        environment["data_meta"].pop("content_sha256", None)
    (copy / "tiny" / "environment.json").write_text(json.dumps(environment))

    data = Experiment.open(copy, "tiny").best().prepared_data()

    assert str(data.path) == environment["data_path"] and data.fingerprint != environment["data_fingerprint"]


def test_report_refuses_data_that_changed_since_the_search(tiny_experiment, tmp_path):
    results, _ = tiny_experiment
    copy = tmp_path / "results"
    shutil.copytree(results / "tiny", copy / "tiny")
    environment = json.loads((copy / "tiny" / "environment.json").read_text())
    environment["data_fingerprint"] = "0" * 64
    environment["data_meta"].update(images_sha256="0" * 64, content_sha256="0" * 64)  # other images
    (copy / "tiny" / "environment.json").write_text(json.dumps(environment))

    result = CliRunner().invoke(app, ["report", "tiny", "--results-dir", str(copy)])

    assert result.exit_code == 2
    assert "not the data experiment 'tiny' was trained on" in result.output
    assert not (copy / "tiny" / "report").exists()  # nothing half-written


def test_report_command(tiny_experiment, tmp_path):
    results, _ = tiny_experiment
    out = tmp_path / "html"
    result = CliRunner().invoke(app, ["report", "--results-dir", str(results), "--out", str(out), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert str(out / PAGE) in result.output.replace("\n", "")
    missing = CliRunner().invoke(app, ["report", "nope", "--results-dir", str(results)])
    assert missing.exit_code == 2 and "no experiment named 'nope'" in missing.output


@pytest.mark.parametrize(
    "arch, size, layer, cells",
    [
        ("vgg16", 64, "features.22", 8),
        ("googlenet", 64, "inception3b", 8),
        ("googlenet", 32, "inception3b", 4),  # no candidate reaches 7 cells: the finest there is
        ("googlenet", 224, "inception5b", 7),
    ],
)
def test_grad_cam_has_the_input_shape_and_varies(arch, size, layer, cells):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=20)
    hands = np.stack(
        [render_hand(12 * age, True, np.random.default_rng(int(age)), size + 8) for age in (3.0, 9.0, 15.0)]
    )
    crops = test_crops(torch.from_numpy(hands), size)[4]

    maps, used, resolution = grad_cam(model, arch, crops)

    assert maps.shape == (3, size, size)
    assert used.endswith(layer) and resolution == cells
    assert maps.min() >= 0 and torch.allclose(maps.amax(dim=(1, 2)), torch.ones(3))
    assert (maps.flatten(1).std(dim=1) > 0.05).all()  # not constant: it points somewhere
    assert not torch.equal(maps[0], maps[1])


def test_grad_cam_follows_the_class_asked_for_and_the_sex_input():
    torch.manual_seed(0)
    model = create_model("vgg16", num_classes=20, sex_input=True)
    hands = np.stack([render_hand(96.0, True, np.random.default_rng(1), 72)])
    crops = test_crops(torch.from_numpy(hands), 64)[4]
    sex = torch.tensor([1.0])

    young, _, _ = grad_cam(model, "vgg16", crops, target=torch.tensor([1]), sex=sex)
    old, _, _ = grad_cam(model, "vgg16", crops, target=torch.tensor([18]), sex=sex)

    assert young.shape == old.shape == (1, 64, 64)
    assert not torch.allclose(young, old)


def test_a_report_of_the_top_two_reports_their_ensemble(tiny_experiment, tmp_path):
    results, _ = tiny_experiment
    out = tmp_path / "ensemble"
    result = CliRunner().invoke(
        app, ["report", "tiny", "--results-dir", str(results), "--out", str(out), "--samples", "2", "--top", "2"]
    )
    assert result.exit_code == 0, result.output
    page = (out / PAGE).read_text()
    assert "the ensemble of the top 2 trials, recomputed now" in page


def test_the_page_renders_in_a_real_browser_with_every_image(tiny_experiment, tmp_path):
    """Debian's chromium, headless, opens the page; a probe appended to a copy counts the images that loaded."""
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    results, _ = tiny_experiment
    folder = write_report(results, "tiny", tmp_path / "report", samples=2)
    copy = shutil.copytree(folder, tmp_path / "opened")
    probe = (
        "<script>window.addEventListener('load', () => { const all = [...document.images];"
        " const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
        " document.body.insertAdjacentHTML('beforeend', `<p id=probe>loaded ${ok} of ${all.length}</p>`); });"
        "</script>"
    )
    page = copy / PAGE
    page.write_text(page.read_text().replace("</body>", probe + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    dom = subprocess.run([browser, *flags, page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    images = len(_figures(page.read_text()))
    assert images >= 8 and f"loaded {images} of {images}" in dom, dom[-500:]
