from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raybone.data.sources import detect_format, find_label_csv, read_dha, read_manifest, read_rsna, scan_source
from raybone.errors import DataError


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(path)
    return path


def _csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _reasons(skipped) -> str:
    return "\n".join(f"{where} | {reason}" for where, reason in skipped)


@pytest.fixture
def rsna(tmp_path):
    """An RSNA-layout folder with one of every kind of row problem."""
    root = tmp_path / "rsna"
    for image_id in ("1", "2", "3", "4", "5", "6", "7"):
        _image(root / "images" / f"{image_id}.png")
    _image(root / "8.jpg")  # the top level is searched too
    _image(root / "images" / "orphan.png")  # no row in the CSV: reported, not fatal
    _csv(
        root / "boneage.csv",
        "id,boneage,male\n"
        "1,150,True\n"  # 12.5 years
        "2,11,False\n"
        "3,abc,True\n"
        "4,-5,True\n"
        "5,300,False\n"
        "6,40,True\n"
        "6,41,True\n"  # duplicate id
        "7,,True\n"
        "8,24,False\n"
        "10,60,True\n",
    )  # no image
    return root


def test_rsna_reads_months_sex_and_paths(rsna):
    table, _ = read_rsna(rsna, rsna / "boneage.csv")
    rows = table.set_index("id")
    assert list(rows.index) == ["1", "2", "8"]
    assert rows.loc["1", "age_months"] == 150.0 and rows.loc["1", "sex"] == "M"
    assert rows.loc["2", "sex"] == "F"
    assert rows.loc["8", "path"].endswith("8.jpg")
    assert rows.loc["1", "path"] == str(rsna / "images" / "1.png")


def test_rsna_skips_bad_rows_with_reasons(rsna):
    _, skipped = read_rsna(rsna, rsna / "boneage.csv")
    reasons = _reasons(skipped)
    assert "id 3: age 'abc' is not a number" in reasons
    assert "id 4: age -5 is negative" in reasons
    assert "id 5: age 300 months is above the 240-month limit" in reasons
    assert reasons.count("id 6: appears 2 times in boneage.csv") == 2
    assert "id 7: age is missing" in reasons
    assert "id 10: no image file found" in reasons
    assert "orphan.png | image has no row in boneage.csv" in reasons
    assert len(skipped) == 8


def test_missing_column_names_it(tmp_path):
    csv = _csv(tmp_path / "boneage.csv", "id,age,male\n1,12,True\n")
    with pytest.raises(DataError, match=r"boneage\.csv: missing column\(s\) 'boneage'"):
        read_rsna(tmp_path, csv)


def test_unreadable_csv_is_a_data_error(tmp_path):
    csv = _csv(tmp_path / "boneage.csv", "")
    with pytest.raises(DataError, match=r"boneage\.csv: not a readable CSV"):
        read_rsna(tmp_path, csv)


def test_dha_age_is_mean_of_two_readings(tmp_path):
    for image_id in ("a1", "a2", "a3"):
        _image(tmp_path / "images" / f"{image_id}.png")
    csv = _csv(tmp_path / "atlas.csv", "id,reading1,reading2,sex\na1,11,14,F\na2,30,37,M\na3,30,x,M\n")
    table, skipped = read_dha(tmp_path, csv)
    assert dict(zip(table["id"], table["age_months"])) == {"a1": 12.5, "a2": 33.5}
    assert list(table["sex"]) == ["F", "M"]
    assert "reading2 'x' is not a number" in _reasons(skipped)


def test_dha_requires_both_readings(tmp_path):
    csv = _csv(tmp_path / "atlas.csv", "id,reading1\na1,11\n")
    with pytest.raises(DataError, match=r"atlas\.csv: missing column\(s\) 'reading2'"):
        read_dha(tmp_path, csv)


@pytest.mark.parametrize(
    "header,row,months",
    [
        ("path,age_years,sex", "hands/a.png,7.5,M", 90.0),
        ("path,age_months,sex", "hands/a.png,90,F", 90.0),
        ("path,reading1,reading2", "hands/a.png,88,92", 90.0),
    ],
)
def test_manifest_age_columns(tmp_path, header, row, months):
    _image(tmp_path / "hands" / "a.png")
    table, skipped = read_manifest(_csv(tmp_path / "manifest.csv", f"{header}\n{row}\n"))
    assert skipped == []
    assert table["age_months"].tolist() == [months]
    assert table["id"].tolist() == ["hands/a"]
    assert table["path"].tolist() == [str((tmp_path / "hands" / "a.png").resolve())]


def test_manifest_refuses_paths_outside_its_folder(tmp_path):
    _image(tmp_path / "outside.png")
    _image(tmp_path / "data" / "inside.png")
    csv = _csv(
        tmp_path / "data" / "manifest.csv",
        f"path,age_months\ninside.png,50\n../outside.png,50\n{tmp_path / 'outside.png'},50\nnope.png,50\n",
    )
    table, skipped = read_manifest(csv)
    assert table["id"].tolist() == ["inside"]
    reasons = _reasons(skipped)
    assert reasons.count("points outside") == 2
    assert "image 'nope.png' not found" in reasons


def test_manifest_without_age_column_names_the_options(tmp_path):
    csv = _csv(tmp_path / "manifest.csv", "path,sex\na.png,M\n")
    with pytest.raises(DataError, match=r"manifest\.csv: missing column\(s\) 'age_months'"):
        read_manifest(csv)


def test_format_is_detected_from_the_header(tmp_path):
    assert detect_format(_csv(tmp_path / "r.csv", "id,boneage,male\n")) == "rsna"
    assert detect_format(_csv(tmp_path / "d.csv", "id,reading1,reading2\n")) == "dha"
    assert detect_format(_csv(tmp_path / "m.csv", "path,age_years\n")) == "manifest"
    with pytest.raises(DataError, match=r"x\.csv: cannot tell the label format"):
        detect_format(_csv(tmp_path / "x.csv", "name,value\n"))


def test_label_csv_is_found_in_a_folder(tmp_path):
    _csv(tmp_path / "notes.csv", "name,value\n")
    atlas = _csv(tmp_path / "atlas.csv", "id,reading1,reading2\n")
    assert find_label_csv(tmp_path) == atlas
    with pytest.raises(DataError, match="no such file or folder"):
        find_label_csv(tmp_path / "absent")


def test_scan_source_uses_labels_override_and_explicit_format(rsna, tmp_path):
    labels = _csv(tmp_path / "elsewhere" / "ages.csv", "id,boneage,male\n1,100,False\n2,101,True\n")
    scan = scan_source(rsna, format="rsna", labels=labels)
    assert scan.format == "rsna" and scan.labels_csv == labels and scan.root == rsna
    assert scan.table["id"].tolist() == ["1", "2"]
    with pytest.raises(DataError, match="unknown format 'png'"):
        scan_source(rsna, format="png")
