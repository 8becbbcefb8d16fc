"""The bad-input catalog: every case is one row. Each gets one clear line naming the file and the problem,
is skipped (data preparation) or rejected before Ray starts (configs, sources), and nothing else is lost.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from typer.testing import CliRunner

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
        ds.PixelData = ((_hand().astype(np.uint16) * 16).tobytes() if syntax == ExplicitVRLittleEndian
                        else pydicom.encaps.encapsulate([b"\0" * 64]))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _rsna(folder: Path, extra_images: dict[str, bytes] = {}, extra_rows: str = "", header: str = "id,boneage,male"):
    (folder / "images").mkdir(parents=True)
    for image_id in GOOD:
        (folder / "images" / f"{image_id}.png").write_bytes(_png_bytes(_hand(len(image_id))))
    for name, data in extra_images.items():
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
    ("DICOM JPEG 2000 without plugin", _image_case("bad.dcm", _dicom_bytes(syntax=JPEG2000Lossless)), "skipped",
     "openjpeg"),
    ("1x1 image", _image_case("bad.png", _png_bytes(np.zeros((1, 1), np.uint8))), "skipped", "1x1"),
    ("20000x20000 image", _image_case("bad.png", _huge_png()), "skipped", "20000x20000"),
    ("RGB image", _image_case("bad.png", _png_bytes(np.stack([_hand()] * 3, -1))), "accepted", ""),
    ("RGBA image", _image_case("bad.png", _png_bytes(np.dstack([_hand()] * 3 + [np.full((48, 48), 255, np.uint8)]))),
     "accepted", ""),
    ("16-bit PNG", _image_case("bad.png", _png_bytes(_hand().astype(np.uint16) * 257)), "accepted", ""),
    ("non-numeric age", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,ten,True\n"), "skipped", "ten"),
    ("negative age", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,-5,True\n"), "skipped", "-5"),
    ("age over 240 months", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,300,True\n"), "skipped", "300"),
    ("duplicate id", lambda f: _rsna(f, {"x.png": _png_bytes(_hand())}, "x,50,True\nx,60,True\n"), "skipped",
     "appears 2 times"),
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
