import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raybone.data import PreparedData, load_prepared, prepare, same_data
from raybone.data.prepare import stratified_split
from raybone.errors import DataError, RayboneError

# raybone.data re-exports the prepare() function under the submodule's name, so fetch the module itself.
prepare_module = importlib.import_module("raybone.data.prepare")

# months -> expected whole-year label
AGES = {"1": 0, "2": 11, "3": 12, "4": 23, "5": 150, "6": 239, "7": 60, "8": 61, "9": 62, "10": 63}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def collection(tmp_path):
    """A small RSNA-layout folder: ten good radiographs and five broken or unlabelled files."""
    root = tmp_path / "hands"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in [*AGES, "16"]:
        Image.fromarray(rng.integers(0, 256, size=(40, 30), dtype=np.uint8)).save(root / "images" / f"{image_id}.png")
    (root / "images" / "11.png").write_text("not an image")
    Image.new("L", (1, 1)).save(root / "images" / "12.png")
    (root / "images" / "13.png").write_bytes((root / "images" / "1.png").read_bytes()[:200])
    Image.new("L", (16, 16)).save(root / "images" / "99.png")  # no row in the CSV
    rows = [f"{image_id},{months},{image_id in ('1', '3')}" for image_id, months in AGES.items()]
    rows += ["11,100,True", "12,100,True", "13,100,True", "14,100,False", "15,abc,True", "16,240,True"]
    (root / "boneage.csv").write_text("id,boneage,male\n" + "\n".join(rows) + "\n")
    return root


def test_prepare_writes_a_complete_artifact(collection, tmp_path):
    data = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    assert {p.name for p in (tmp_path / "prepared").iterdir()} == {
        "images.npy",
        "manifest.parquet",
        "skipped.csv",
        "prepared.json",
        ".raybone.json",
    }
    assert data.images.dtype == np.uint8 and data.images.shape == (10, 16, 16)
    assert list(data.manifest.columns) == ["id", "label", "age_months", "sex", "split", "source", "checksum"]
    expected = {image_id: months // 12 for image_id, months in AGES.items()}
    assert dict(zip(data.manifest["id"], data.labels.tolist())) == expected
    assert data.labels.dtype == np.int64
    assert data.manifest["id"].tolist() == [str(i) for i in range(1, 11)]  # natural id order
    assert data.sex_code.tolist() == [1, 0, 1] + [0] * 7
    assert data.sex_code.dtype == np.int8 and data.is_train.dtype == bool
    assert set(data.manifest["split"]) <= {"train", "val"}
    assert data.manifest["checksum"].str.len().eq(64).all()
    assert data.meta["image_size"] == 16 and data.meta["counts"]["images"] == 10
    assert data.meta["counts"]["skipped"] == 7 and len(data.fingerprint) == 64


def test_images_match_their_source_files(collection, tmp_path):
    data = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    first = np.asarray(Image.open(collection / "images" / "1.png").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.abs(data.images[0].astype(int) - first.astype(int)).max() <= 1
    assert data.manifest["source"][0] == str(collection / "images" / "1.png")


def test_skipped_csv_explains_every_problem(collection, tmp_path):
    prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    skipped = pd.read_csv(tmp_path / "prepared" / "skipped.csv")
    assert list(skipped.columns) == ["file", "reason"]
    reasons = "\n".join(skipped["file"] + " | " + skipped["reason"])
    assert "11.png | not a readable PNG, JPEG or DICOM image" in reasons
    assert "12.png | image is 1x1 px; too small" in reasons
    assert "13.png | truncated or corrupt PNG data" in reasons
    assert "id 14: no image file found" in reasons
    assert "id 15: age 'abc' is not a number" in reasons
    assert "age 240 months is beyond the 20 configured classes" in reasons
    assert "99.png | image has no row in boneage.csv" in reasons
    assert len(skipped) == 7


def test_a_sex_raybone_cannot_read_is_kept_as_unknown_and_named(collection, tmp_path, capsys):
    """'maybe' and 'X' became unknown without a word: a model with sex input learned them so."""
    csv = collection / "boneage.csv"
    csv.write_text(csv.read_text().replace("1,0,True", "1,0,maybe").replace("2,11,False", "2,11,X"))
    data = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    assert data.manifest.set_index("id").loc[["1", "2", "3"], "sex"].tolist() == ["", "", "M"]
    said = " ".join(capsys.readouterr().err.split())
    assert "warning: 2 rows give a sex raybone cannot read (id 1: 'maybe'; id 2: 'X')" in said


def test_second_prepare_reuses_the_artifact_without_decoding(collection, tmp_path, monkeypatch):
    first = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cached artifact should have been reused")

    monkeypatch.setattr(prepare_module, "_decode_all", no_decoding)
    second = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.images, first.images)
    pd.testing.assert_frame_equal(second.manifest, first.manifest)


def test_changed_settings_or_files_change_the_fingerprint(collection, tmp_path):
    base = prepare(collection, out=tmp_path / "a", image_size=16, progress=False)
    reseeded = prepare(collection, out=tmp_path / "b", image_size=16, seed=1, progress=False)
    assert reseeded.fingerprint != base.fingerprint
    Image.new("L", (20, 20), 50).save(collection / "images" / "2.png")  # a replaced radiograph
    assert prepare(collection, out=tmp_path / "c", image_size=16, progress=False).fingerprint != base.fingerprint


def test_a_copied_source_is_the_same_data_and_a_relabelled_one_is_not(collection, tmp_path):
    """A copy with new file dates is prepared again (new fingerprint) but holds the same data; a changed
    reading, sex or split does not, also for artifacts written before content_sha256."""
    base = prepare(collection, out=tmp_path / "a", image_size=16, progress=False)
    copy = shutil.copytree(collection, tmp_path / "copy")
    for image in (copy / "images").iterdir():
        os.utime(image, ns=(1, 1))  # copied with new file dates
    copied = prepare(copy, out=tmp_path / "b", image_size=16, progress=False)
    assert copied.fingerprint != base.fingerprint and same_data(copied.meta, base.meta)

    csv = copy / "boneage.csv"
    original = csv.read_text()
    changed = {}
    for change, text in {"reading": ("3,12,", "3,30,"), "sex": ("3,12,True", "3,12,False")}.items():
        csv.write_text(original.replace(*text))
        changed[change] = prepare(copy, out=tmp_path / change, image_size=16, progress=False)
        np.testing.assert_array_equal(changed[change].images, base.images)
        assert not same_data(changed[change].meta, base.meta)
    resplit = prepare(collection, out=tmp_path / "d", image_size=16, val_fraction=0.5, progress=False)
    assert not same_data(resplit.meta, base.meta)

    def legacy(meta: dict) -> dict:
        return {key: value for key, value in meta.items() if key != "content_sha256"}

    assert same_data(legacy(copied.meta), legacy(base.meta))
    assert same_data(copied.meta, legacy(base.meta))  # an experiment recorded before the hash, data prepared now
    assert not same_data(legacy(changed["reading"].meta), base.meta)  # a reading in another year: other counts
    assert not same_data(legacy(resplit.meta), legacy(base.meta))


def test_default_output_goes_to_the_cache_not_beside_the_images(collection, cache):
    data = prepare(collection, image_size=16, progress=False)
    assert data.path == cache / "prepared" / f"hands-{data.fingerprint[:12]}"
    assert sorted(p.name for p in collection.iterdir()) == ["boneage.csv", "images"]
    assert not list(data.path.parent.glob(".*tmp*"))  # no staging folder left behind


def test_output_inside_the_source_is_refused(collection):
    with pytest.raises(DataError, match="must not be written inside the source folder"):
        prepare(collection, out=collection / "prepared", image_size=16, progress=False)


def test_output_over_an_unrelated_folder_is_refused(collection, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(RayboneError, match="mine: exists and was not written by raybone .it holds thesis.tex"):
        prepare(collection, out=tmp_path / "mine", image_size=16, progress=False)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_an_artifact_folder_is_loaded_as_a_source(collection, tmp_path):
    built = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    loaded = prepare(tmp_path / "prepared", progress=False)
    assert isinstance(loaded, PreparedData) and loaded.fingerprint == built.fingerprint


def test_load_prepared_detects_a_tampered_images_file(collection, tmp_path):
    prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    images = np.load(tmp_path / "prepared" / "images.npy")
    images[0, 0, 0] ^= 1
    np.save(tmp_path / "prepared" / "images.npy", images)
    with pytest.raises(DataError, match=r"images\.npy: checksum does not match"):
        load_prepared(tmp_path / "prepared")


def test_load_prepared_reports_missing_parts(collection, tmp_path):
    prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    (tmp_path / "prepared" / "images.npy").unlink()
    with pytest.raises(DataError, match=r"images\.npy: cannot read"):
        load_prepared(tmp_path / "prepared")
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_prepared(tmp_path)


def test_a_corrupt_cached_artifact_is_rebuilt(collection, tmp_path):
    first = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    (tmp_path / "prepared" / "images.npy").write_bytes(b"garbage")
    again = prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    np.testing.assert_array_equal(again.images, first.images)
    load_prepared(tmp_path / "prepared")


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_text("nope")
    Image.new("L", (1, 1)).save(tmp_path / "images" / "2.png")
    (tmp_path / "boneage.csv").write_text("id,boneage,male\n1,12,True\n2,12,True\n3,abc,True\n")
    with pytest.raises(DataError, match=r"boneage\.csv: no usable images \(3 skipped; ") as refused:
        prepare(tmp_path, out=tmp_path.parent / "out", image_size=16, progress=False)
    # no skipped.csv is written, so each reason is in the message (only the first was)
    assert all(f"{where}: " in str(refused.value) for where in ("boneage.csv line 4", "1.png", "2.png"))


def test_loaded_images_are_writable_arrays(collection, tmp_path):
    prepare(collection, out=tmp_path / "prepared", image_size=16, progress=False)
    data = load_prepared(tmp_path / "prepared")
    assert data.images.flags.writeable and data.images.shape == (10, 16, 16)
    assert json.loads((tmp_path / "prepared" / "prepared.json").read_text())["fingerprint"] == data.fingerprint


def test_demo_generates_and_prepares_the_phantom_atlas(cache):
    data = prepare("demo", image_size=32, progress=False)
    assert len(data.images) == 600 and data.images.shape[1:] == (32, 32)
    assert (cache / "demo-atlas-0-32" / "boneage.csv").is_file()
    assert np.bincount(data.labels).tolist() == [30] * 20
    assert prepare("demo", image_size=32, progress=False).fingerprint == data.fingerprint  # cached


def test_dha_and_manifest_labels_are_whole_years_of_the_age(tmp_path):
    atlas = tmp_path / "atlas"
    (atlas / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("L", (20, 24), 90).save(atlas / "images" / f"{name}.png")
    # floor(mean(11, 14) / 12) = 1, although the readings' own whole years (0 and 1) average 0.5
    (atlas / "dha.csv").write_text("id,reading1,reading2,sex\na,11,14,F\nb,100,110,M\nc,0,0,M\n")
    dha = prepare(atlas, out=tmp_path / "dha", image_size=8, progress=False)
    assert dha.meta["format"] == "dha"
    assert dict(zip(dha.manifest["id"], dha.labels.tolist())) == {"a": 1, "b": 8, "c": 0}
    assert dha.manifest["age_months"].tolist() == [12.5, 105.0, 0.0]

    (atlas / "dha.csv").unlink()
    (atlas / "manifest.csv").write_text("path,age_years\nimages/a.png,7.99\nimages/b.png,8\n")
    manifest = prepare(atlas / "manifest.csv", out=tmp_path / "manifest", image_size=8, progress=False)
    assert manifest.meta["format"] == "manifest" and manifest.labels.tolist() == [7, 8]


# ---------------------------------------------------------------- split


def test_split_is_stratified_about_75_25():
    labels = np.repeat(np.arange(5), [100, 40, 8, 3, 1])
    is_val = stratified_split(labels, 0.25, seed=0)
    for label, n in zip(range(5), [100, 40, 8, 3, 1]):
        n_val = int(is_val[labels == label].sum())
        assert abs(n_val - 0.25 * n) <= 0.5 + 1e-9, label
    assert not is_val[labels == 4].any()  # a class seen once is trained on


def test_split_depends_only_on_the_seed():
    labels = np.repeat(np.arange(4), 50)
    np.testing.assert_array_equal(stratified_split(labels, 0.25, 7), stratified_split(labels, 0.25, 7))
    assert (stratified_split(labels, 0.25, 7) != stratified_split(labels, 0.25, 8)).any()


def test_split_is_saved_in_the_manifest(collection, tmp_path):
    data = prepare(collection, out=tmp_path / "p", image_size=16, seed=3, progress=False)
    expected = stratified_split(data.labels, 0.25, 3)
    np.testing.assert_array_equal(~data.is_train, expected)


# ---------------------------------------------------------------- real radiographs


def test_real_rsna_raw(shared_data, tmp_path):
    data = prepare(shared_data / "rsna-raw", out=tmp_path / "raw", image_size=64, progress=False)
    assert data.images.shape == (300, 64, 64)
    assert data.meta["counts"]["skipped"] == 0
    assert pd.read_csv(tmp_path / "raw" / "skipped.csv").empty
    assert 0.2 < (~data.is_train).mean() < 0.3
    assert data.images.std() > 20  # real pictures, not blanks


def test_real_rsna_full(shared_data, tmp_path):
    data = prepare(shared_data / "rsna-full", out=tmp_path / "full", image_size=64, progress=False)
    assert len(data.images) == 35 and data.meta["counts"]["skipped"] == 0
    assert set(data.manifest["sex"]) <= {"M", "F"}
    assert Path(data.manifest["source"][0]).is_relative_to(shared_data / "rsna-full")
