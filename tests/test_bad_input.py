"""The bad-input catalog: every case is one row. Each gets one clear line naming the file and the problem,
is skipped (data preparation) or rejected before Ray starts (configs, sources), and nothing else is lost.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import write_dicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless
from typer.testing import CliRunner

from raybone import files
from raybone.cli import app

GOOD = {f"g{i}": 24 * i + 6 for i in range(8)}  # id -> bone age in months, four whole-year classes


def _hand(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_hand()).save(buffer, format="JPEG")
    return buffer.getvalue()


def _huge_png() -> bytes:
    """A valid PNG header claiming 20000 x 20000 px: it must be refused before any pixel is decoded."""
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return _png_bytes(_hand())[:8] + ihdr + _png_bytes(_hand())[33:]


def _dicom_bytes(with_pixels: bool = True, syntax=ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows = ds.Columns = 48
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if with_pixels:
        ds.PixelData = (
            (_hand().astype(np.uint16) * 16).tobytes()
            if syntax == ExplicitVRLittleEndian
            else pydicom.encaps.encapsulate([b"\0" * 64])
        )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _rsna(
    folder: Path, extra_images: dict[str, bytes] | None = None, extra_rows: str = "", header: str = "id,boneage,male"
):
    (folder / "images").mkdir(parents=True)
    for image_id in GOOD:
        (folder / "images" / f"{image_id}.png").write_bytes(_png_bytes(_hand(len(image_id))))
    for name, data in (extra_images or {}).items():
        (folder / "images" / name).write_bytes(data)
    rows = "".join(f"{i},{m},True\n" for i, m in GOOD.items())
    (folder / "boneage.csv").write_text(f"{header}\n{rows}{extra_rows}")


def _image_case(name: str, data: bytes):
    return lambda folder: _rsna(folder, {name: data}, f"{Path(name).stem},100,False\n")


# (case, how to build the source folder, expected: "skipped" | "accepted" | "error", text the message must hold)
DATA_CASES = [
    ("zero-byte file", _image_case("bad.png", b""), "skipped", "bad.png"),
    ("truncated PNG", _image_case("bad.png", _png_bytes(_hand())[:60]), "skipped", "bad.png"),
    ("truncated JPEG", _image_case("bad.jpg", _jpeg_bytes()[:200]), "skipped", "bad.jpg"),
    ("text named .png", _image_case("bad.png", b"this is not an image\n"), "skipped", "bad.png"),
    ("DICOM without pixels", _image_case("bad.dcm", _dicom_bytes(with_pixels=False)), "skipped", "pixel data"),
    (
        "DICOM JPEG 2000 without plugin",
        _image_case("bad.dcm", _dicom_bytes(syntax=JPEG2000Lossless)),
        "skipped",
        "openjpeg",
    ),
    ("1x1 image", _image_case("bad.png", _png_bytes(np.zeros((1, 1), np.uint8))), "skipped", "1x1"),
    ("20000x20000 image", _image_case("bad.png", _huge_png()), "skipped", "20000x20000"),
    ("RGB image", _image_case("bad.png", _png_bytes(np.stack([_hand()] * 3, -1))), "accepted", ""),
    (
        "RGBA image",
        _image_case("bad.png", _png_bytes(np.dstack([_hand()] * 3 + [np.full((48, 48), 255, np.uint8)]))),
        "accepted",
        "",
    ),
    ("16-bit PNG", _image_case("bad.png", _png_bytes(_hand().astype(np.uint16) * 257)), "accepted", ""),
    ("non-numeric age", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,ten,True\n"), "skipped", "ten"),
    ("negative age", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,-5,True\n"), "skipped", "-5"),
    ("age over 240 months", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,300,True\n"), "skipped", "300"),
    (
        "duplicate id",
        lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,50,True\nx,60,True\n"),
        "skipped",
        "appears 2 times",
    ),
    ("id with no image", lambda f: _rsna(f, {}, "ghost,50,True\n"), "skipped", "ghost"),
    ("image with no id", lambda f: _rsna(f, {"orphan.png": _png_bytes(_hand())}), "skipped", "orphan.png"),
    ("CSV missing a column", lambda f: _rsna(f, header="id,age,male"), "error", "boneage"),
    ("empty folder", lambda f: f.mkdir(), "error", "empty"),
]


def _manifest_escaping(folder: Path) -> None:
    folder.mkdir()
    rows = [f"img{i}.png,{m}" for i, m in enumerate(GOOD.values())] + ["../outside.png,50"]
    for i in range(len(GOOD)):
        (folder / f"img{i}.png").write_bytes(_png_bytes(_hand(i)))
    (folder.parent / "outside.png").write_bytes(_png_bytes(_hand()))
    (folder / "manifest.csv").write_text("path,age_months\n" + "\n".join(rows) + "\n")


DATA_CASES.append(("manifest path outside its folder", _manifest_escaping, "skipped", "outside"))

runner = CliRunner()


@pytest.mark.parametrize("case, build, expected, text", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_catalog(tmp_path, case, build, expected, text):
    source, out = tmp_path / "source", tmp_path / "prepared"
    build(source)
    target = source / "manifest.csv" if (source / "manifest.csv").exists() else source
    result = runner.invoke(app, ["data", "prepare", str(target), "--out", str(out), "--image-size", "32"])
    assert "Traceback" not in result.output
    if expected == "error":
        assert result.exit_code == 2, result.output
        (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert str(source.name) in line and text in line.lower()
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == len(GOOD) + (expected == "accepted"), "good images were lost"
    skipped = pd.read_csv(out / "skipped.csv")
    if expected == "accepted":
        assert skipped.empty and "bad" in set(manifest.id)
    else:
        assert len(skipped) >= 1
        reasons = " ".join(skipped.astype(str).agg(" ".join, axis=1)).lower()
        assert text.lower() in reasons, reasons
        assert all("\n" not in r for r in skipped.iloc[:, 1].astype(str))


CONFIG_CASES = [
    ("unknown key", ["search", "--set", "bogus=1"], "bogus"),
    ("impossible range", ["search", "--set", "lr={distribution: loguniform, low: 1.0, high: 0.1}"], "low (1.0) must"),
    ("results name that does not exist", ["results", "no-such-experiment"], "no-such-experiment"),
    ("resume of nothing", ["search", "--resume", "no-such-experiment"], "no-such-experiment"),
]


@pytest.mark.parametrize("case, args, text", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_catalog_is_rejected_before_ray_starts(tmp_path, case, args, text):
    result = runner.invoke(app, [*args, "--results-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- predict: hostile files beside good ones


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _valid_png16_of_zeros(side: int = 11999) -> bytes:
    """A real, complete 16-bit grey PNG of side x side black pixels: about 280 KB that decode to 288 MB."""
    deflate = zlib.compressobj(9)
    row = bytes(1 + 2 * side)  # filter byte 0, then the row's pixels
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _deflated_dicom_bomb(path: Path, side: int = 12000) -> None:
    """A deflated DICOM (about 300 KB) whose dataset inflates to side x side x 2 zero bytes (275 MiB)."""
    write_dicom(
        path, np.zeros((1, 1), np.uint16), syntax=DeflatedExplicitVRLittleEndian, pixel_data=bytes(side * side * 2)
    )


def _write(name: str, data: bytes):
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return build


def _with(name: str, make):
    def build(folder: Path) -> Path:
        make(folder / name)
        return folder / name

    return build


def _gif(path: Path, format: str = "GIF") -> None:
    Image.fromarray(_hand()).save(path, format=format)


# (case, build(folder) -> the bad input, text its one error line must hold)
PREDICT_CASES = [
    ("16-bit PNG of 11999 x 11999 px", _write("huge16.png", _valid_png16_of_zeros()), "30-megapixel limit"),
    ("PNG header claiming 20000 px", _write("claims.png", _huge_png()), "20000x20000"),
    ("deflated DICOM bomb", _with("bomb.dcm", _deflated_dicom_bomb), "inflates to more than 256 MiB"),
    (
        "multi-frame DICOM",
        _with("frames.dcm", lambda p: write_dicom(p, np.zeros((3, 48, 48), np.uint16))),
        "holds 3 frames; raybone reads single-frame radiographs",
    ),
    ("FIFO named .png", _with("pipe.png", os.mkfifo), "is a FIFO, not a file"),
    ("GIF file", _with("scan.gif", _gif), ".gif images are not read"),
    ("GIF bytes named .png", _with("scan.png", _gif), "GIF image; raybone reads PNG, JPEG and DICOM"),
    ("text named .png", _write("text.png", b"this is not an image\n"), "not a readable PNG, JPEG or DICOM"),
    ("empty file", _write("empty.jpg", b""), "file is empty"),
    ("DICOM JPEG 2000 without plugin", _write("j2k.dcm", _dicom_bytes(syntax=JPEG2000Lossless)), "openjpeg"),
]


@pytest.fixture
def good_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"good{i}.png").write_bytes(_png_bytes(_hand(i)))
    return folder


def _reported(result) -> list[str]:
    """stderr's lines but the demo-atlas warning: the tiny model learned the phantom atlas, not radiographs."""
    return [line for line in result.stderr.splitlines() if line.strip() and "synthetic phantom demo atlas" not in line]


def _one_error_line(result, about: Path, text: str) -> None:
    assert "Traceback" not in result.output
    lines = _reported(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {about}: ") and text in lines[0], lines[0]


@pytest.mark.timeout(600)  # a hang (a FIFO opened) fails; the tiny search may build first
@pytest.mark.parametrize("case, build, text", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_catalog(tiny_model, good_folder, case, build, text):
    bad = build(good_folder)
    result = runner.invoke(app, ["predict", str(tiny_model), str(good_folder), "--format", "csv"])
    assert result.exit_code == 1, result.output
    _one_error_line(result, bad, text)
    predicted = pd.read_csv(io.StringIO(result.stdout)).file.tolist()
    assert predicted == [str(good_folder / "good0.png"), str(good_folder / "good1.png")], "good images were lost"
    assert "BytesIO" not in result.stderr


@pytest.mark.timeout(600)  # a hang (a FIFO opened) fails; the tiny search may build first
@pytest.mark.parametrize("device", ["/dev/zero", "fifo"])
def test_predict_refuses_a_device_or_fifo_named_as_input(tiny_model, good_folder, device):
    named = Path(device)
    if device == "fifo":
        named = good_folder.parent / "named-fifo"
        os.mkfifo(named)
    result = runner.invoke(
        app, ["predict", str(tiny_model), str(named), str(good_folder / "good0.png"), "--format", "csv"]
    )
    assert result.exit_code == 1
    _one_error_line(result, named, "a FIFO" if device == "fifo" else "a character device")
    assert "good0.png" in result.stdout


NAMES = [  # (case, file name as bytes, how every output must show it)
    ("non-UTF-8 bytes", b"caf\xe9-\xff.png", "caf\\xe9-\\xff.png"),
    ("terminal escape code", b"esc\x1b[31mred.png", "esc\\x1b[31mred.png"),
    ("newline", b"two\nlines.png", "two\\x0alines.png"),
]


@pytest.mark.parametrize("case, raw, shown", NAMES, ids=[n[0] for n in NAMES])
@pytest.mark.parametrize("format", ["csv", "json", "table"])
def test_odd_file_names_are_predicted_and_shown_escaped(tiny_model, good_folder, case, raw, shown, format, monkeypatch):
    Path(os.fsdecode(os.fsencode(good_folder) + b"/" + raw)).write_bytes(_png_bytes(_hand(5)))
    monkeypatch.chdir(good_folder)  # short relative paths: the table does not wrap them
    result = runner.invoke(app, ["predict", str(tiny_model), ".", "--format", format])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\udcff" not in result.stdout
    if format == "json":
        assert {r["file"] for r in json.loads(result.stdout)} == {"good0.png", "good1.png", shown}
    elif format == "csv":
        assert set(pd.read_csv(io.StringIO(result.stdout)).file) == {"good0.png", "good1.png", shown}
    else:
        assert shown in result.stdout


def test_csv_cells_cannot_start_a_formula(tiny_model, good_folder, monkeypatch):
    for name in ("=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png"):
        (good_folder / name).write_bytes(_png_bytes(_hand()))
    monkeypatch.chdir(good_folder)
    result = runner.invoke(
        app,
        [
            "predict",
            str(tiny_model),
            "--format",
            "csv",
            "--",
            "=HYPERLINK(1).png",
            "+1.png",
            "-1.png",
            "@SUM(1).png",
            "good0.png",
        ],
    )
    assert result.exit_code == 0, result.output
    files = pd.read_csv(io.StringIO(result.stdout)).file.tolist()
    assert files == ["'=HYPERLINK(1).png", "'+1.png", "'-1.png", "'@SUM(1).png", "good0.png"]


def test_prepare_with_odd_file_names_writes_its_tables(tmp_path):
    _rsna(tmp_path / "source", {os.fsdecode(b"stray-\xff.png"): _png_bytes(_hand())}, extra_rows='"bad\nid",50,True\n')
    (tmp_path / "source" / "images" / "old.gif").write_bytes(b"GIF89a")
    result = runner.invoke(
        app, ["data", "prepare", str(tmp_path / "source"), "--out", str(tmp_path / "p"), "--image-size", "32"]
    )
    assert result.exit_code == 0, result.output
    skipped = pd.read_csv(tmp_path / "p" / "skipped.csv")
    reasons = dict(zip(skipped.file.map(lambda f: Path(f).name), skipped.reason))
    assert reasons["stray-\\xff.png"] == "image has no row in boneage.csv"
    assert ".gif images are not read" in reasons["old.gif"]
    assert any("bad\\x0aid" in reason for reason in reasons.values())
    assert all("\n" not in reason for reason in reasons.values())


# ---------------------------------------------------------------- tampered model folders and experiments


def _model_json(change: dict):
    def tamper(model: Path) -> None:
        meta = json.loads((model / "model.json").read_text())
        (model / "model.json").write_text(json.dumps({**meta, **change}))

    return tamper


def _zero_weights(model: Path) -> None:
    weights = model / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_size :] = bytes(len(raw) - 8 - header_size)
    weights.write_bytes(bytes(raw))


def _zero_onnx_tail(model: Path) -> None:
    onnx = model / "model.onnx"
    raw = bytearray(onnx.read_bytes())
    raw[-4096:] = bytes(4096)  # the last initializers' floats
    onnx.write_bytes(bytes(raw))


BACKEND = {"zeroed weights": "torch"}  # the default ONNX backend reads model.onnx, never the safetensors

MODEL_CASES = [
    (
        "format_version as a string",
        _model_json({"format_version": "1"}),
        "format_version: Input should be a valid integer",
    ),
    ("newer format", _model_json({"format_version": 99}), "model format 99 is newer than this raybone"),
    ("unknown model", _model_json({"model": "resnet"}), "unknown model 'resnet'"),
    ("non-numeric image_size", _model_json({"image_size": "big"}), "image_size: Input should be a valid integer"),
    ("image_size 0", _model_json({"image_size": 0}), "image_size: Input should be greater than or equal to 8"),
    ("input_size above image_size", _model_json({"input_size": 64}), "input_size 64 is larger than the image"),
    ("sha256 removed", _model_json({"sha256": {}}), "sha256 of weights.safetensors missing"),
    ("zeroed weights", _zero_weights, "weights.safetensors: sha256 does not match model.json"),
    ("zeroed ONNX weights", _zero_onnx_tail, "model.onnx: sha256 does not match model.json"),
    ("model.json not JSON", lambda m: (m / "model.json").write_text("{"), "model.json: unreadable"),
    ("model.json a FIFO", lambda m: ((m / "model.json").unlink(), os.mkfifo(m / "model.json")), "is a FIFO"),
]


@pytest.mark.timeout(600)  # a hang (a FIFO opened) fails; the tiny search may build first
@pytest.mark.parametrize("case, tamper, text", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_tampered_model_folders_are_refused_in_one_line(tiny_model, good_folder, tmp_path, case, tamper, text):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tamper(model)
    backend = ["--backend", BACKEND.get(case, "auto")]
    result = runner.invoke(app, ["predict", str(model), str(good_folder), "--format", "json", *backend])
    assert result.exit_code == 2 and result.stdout == "", result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}") and text in lines[0], result.stderr


def test_errors_go_to_stderr_never_into_the_output(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "nosuchmodel"), "x.png", "--format", "json"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path / 'nosuchmodel'}: no such model folder")


def _truncate(name: str, keep: int):
    def tamper(experiment: Path) -> None:
        table = experiment / name
        table.write_bytes(table.read_bytes()[:keep])

    return tamper


EXPERIMENT_CASES = [  # (case, tamper(experiment folder), commands that read what was tampered with)
    ("truncated trials.parquet", _truncate("trials.parquet", 100), [["results"], ["best"], ["report"]]),
    ("empty trials.parquet", _truncate("trials.parquet", 0), [["results"], ["best"], ["report"]]),
    ("truncated history.parquet", _truncate("history.parquet", 100), [["report"]]),
]


@pytest.mark.parametrize("case, tamper, commands", EXPERIMENT_CASES, ids=[c[0] for c in EXPERIMENT_CASES])
def test_damaged_tables_are_one_line_errors(tiny_experiment, tmp_path, case, tamper, commands):
    results, _ = tiny_experiment
    shutil.copytree(results / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("report"))
    tamper(tmp_path / "tiny")
    for command in commands:
        result = runner.invoke(app, [*command, "tiny", "--results-dir", str(tmp_path)])
        assert result.exit_code == 2, (command, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "parquet: unreadable table" in lines[0], (command, result.output)
    assert not (tmp_path / "tiny" / "report").exists()


# ---------------------------------------------------------------- writing: only where raybone may


def _mine(folder: Path) -> dict[str, bytes]:
    """The user's files in `folder`, to check that they survive."""
    (folder / "important").mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("years of work")
    (folder / "important" / "patients.csv").write_text("id\n1\n")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _still(folder: Path, before: dict[str, bytes]) -> None:
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def _refused(result, path: Path, text: str) -> None:
    assert result.exit_code == 2, result.output
    lines = _reported(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and text in lines[0], result.stderr


@pytest.mark.parametrize("force", [False, True])
def test_report_refuses_a_folder_it_did_not_write(tiny_experiment, tmp_path, monkeypatch, force):
    results, _ = tiny_experiment
    before = _mine(tmp_path / "home")
    monkeypatch.chdir(tmp_path / "home")
    result = runner.invoke(app, ["report", "tiny", "--results-dir", str(results), "--out", ".", *["--force"] * force])
    _refused(result, tmp_path / "home", "exists and was not written by raybone")
    _still(tmp_path / "home", before)


def test_export_keeps_a_users_file_in_an_earlier_model_folder(tiny_experiment, tiny_model, tmp_path):
    results, _ = tiny_experiment
    model = tmp_path / "m2"
    shutil.copytree(tiny_model, model)
    (model / "notes.txt").write_text("my notes")
    result = runner.invoke(app, ["best", "tiny", "--results-dir", str(results), "--export", str(model)])
    _refused(result, model, "holds files raybone did not write (notes.txt)")
    assert (model / "notes.txt").read_text() == "my notes"
    forced = runner.invoke(app, ["best", "tiny", "--results-dir", str(results), "--export", str(model), "--force"])
    assert forced.exit_code == 0 and not (model / "notes.txt").exists()


def test_prepare_refuses_to_put_a_dataset_over_a_file(tmp_path):
    _rsna(tmp_path / "source")
    (tmp_path / "scan.png").write_bytes(b"my radiograph")
    result = runner.invoke(
        app, ["data", "prepare", str(tmp_path / "source"), "--out", str(tmp_path / "scan.png"), "--image-size", "32"]
    )
    _refused(result, tmp_path / "scan.png", "exists and is not a folder")
    assert (tmp_path / "scan.png").read_bytes() == b"my radiograph"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_evaluate_refuses_to_overwrite_a_users_file(tiny_model, tmp_path):
    (tmp_path / "thesis.json").write_text('{"chapter": 1}')
    result = runner.invoke(
        app, ["evaluate", str(tiny_model), "--data", "demo", "--json", str(tmp_path / "thesis.json")]
    )
    _refused(result, tmp_path / "thesis.json", "exists and was not written by raybone evaluate")
    assert (tmp_path / "thesis.json").read_text() == '{"chapter": 1}'


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path):
    _rsna(tmp_path / "source")
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    leftover = tmp_path / f".prepared.tmp-{files._HOST}-{killed.pid}-0123abcd"
    leftover.mkdir()
    (leftover / "images.npy").write_bytes(b"half")
    (leftover / files.MARKER).write_text('{"kind": "prepared dataset", "files": []}')
    foreign = tmp_path / ".prepared.tmp-elsewhere-1-0123abcd"  # not raybone's marker: never touched
    foreign.mkdir()
    result = runner.invoke(
        app, ["data", "prepare", str(tmp_path / "source"), "--out", str(tmp_path / "prepared"), "--image-size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "prepared", "source"]


# ---------------------------------------------------------------- a full or read-only disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs); skipped where this machine does not let the tests mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_disk, tiny_experiment, tiny_model, tmp_path):
    results, _ = tiny_experiment
    (small_disk / "filler").write_bytes(bytes(2 * 2**20 - 64 * 1024))  # leave 64 KiB
    _rsna(tmp_path / "source")
    runs = {  # what is written: the command
        small_disk / "prepared": [
            "data",
            "prepare",
            str(tmp_path / "source"),
            "--out",
            str(small_disk / "prepared"),
            "--image-size",
            "64",
        ],
        small_disk / "model": ["best", "tiny", "--results-dir", str(results), "--export", str(small_disk / "model")],
        small_disk / "e.json": ["evaluate", str(tiny_model), "--data", "demo", "--json", str(small_disk / "e.json")],
    }
    (small_disk / "filler2").write_bytes(bytes(60 * 1024))  # the JSON still fits without this
    for written, args in runs.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (written, result.output)
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line == f"error: {written}: No space left on device", result.stderr
        assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "filler2"], written


def test_decoder_warnings_stay_off_stderr(tiny_model, good_folder):
    ds = pydicom.dcmread(write_dicom(good_folder / "odd.dcm", _hand().astype(np.uint16) * 16))
    ds.PatientName = "A" * 100  # readable, but pydicom warns that a PN component exceeds 64 characters
    ds.save_as(good_folder / "odd.dcm")
    result = runner.invoke(app, ["predict", str(tiny_model), str(good_folder), "--format", "csv"])
    assert result.exit_code == 0 and _reported(result) == [], result.stderr
    assert len(pd.read_csv(io.StringIO(result.stdout))) == 3


def test_evaluate_on_an_unlabelled_folder_says_what_to_do(tiny_model, good_folder):
    result = runner.invoke(app, ["evaluate", str(tiny_model), "--data", str(good_folder)])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {good_folder}: no label CSV found (expected boneage.csv); name the label CSV "
        "itself instead of the folder\n"
    )


@pytest.mark.timeout(600)  # a hang (a FIFO opened) fails; the tiny search may build first
@pytest.mark.parametrize("option", ["--labels", "--sex-csv"])
def test_a_device_as_a_csv_is_refused(tiny_model, good_folder, tmp_path, option):
    _rsna(tmp_path / "source")
    args = (
        ["data", "prepare", str(tmp_path / "source"), "--labels", "/dev/zero", "--out", str(tmp_path / "p")]
        if option == "--labels"
        else ["predict", str(tiny_model), str(good_folder), "--sex-csv", "/dev/zero"]
    )
    result = runner.invoke(app, args)
    _refused(result, Path("/dev/zero"), "is a character device, not a file")
    assert not (tmp_path / "p").exists()


@pytest.mark.timeout(600)  # a hang (a FIFO opened) fails; the tiny search may build first
def test_unreachable_object_storage_is_one_line():
    unreachable = "s3://bucket/searches?endpoint_override=127.0.0.1:9&scheme=http"  # nothing listens on port 9
    result = runner.invoke(app, ["results", "--results-dir", unreachable])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bucket 'bucket'" in lines[0] and "Could not connect" in lines[0], result.stderr
