"""Peak memory of `raybone predict` and `raybone data prepare` on hostile and on large inputs.

Arms, each a fresh `raybone` process whose peak RSS is read from the kernel (wait4):
  good       predict on two good radiographs: the baseline (Python, torch, the model)
  catalog    predict on the bad-input catalog beside the same two: two valid 16-bit PNGs of 11,999 x 11,999 px
             (280 KB each, 288 MB decoded), a 1 MB deflated DICOM that inflates to 1 GiB, a multi-frame DICOM,
             /dev/zero, a FIFO, a GIF, GIF bytes named .png, a non-UTF-8 file name
  prepare    `data prepare` of the same catalog as an RSNA source
  large-2 / large-16
             predict on 8 legitimate 24-megapixel 16-bit DICOMs (rescale and window: the costliest path) with the
             decoder threads a 2-core and a 16-core machine start (os.cpu_count patched in the child): the decode
             memory budget must keep both within baseline + DECODE_MEMORY
  large-16-unbounded
             the control: large-16 with the budget lifted
Goal (issue 13): peak RSS of predict over the catalog <= 1.5 GB, and large-16 / large-2 close to 1.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from _common import finish, parse_args

GOAL_GB = 1.5
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    args = parse_args(__doc__, quick_help="skip the large-image arms")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raybone-bad-input-") as tmp:
        root = Path(tmp)
        model = _untrained_model(root)
        good, catalog = root / "good", root / "catalog"
        _good_images(good)
        _good_images(catalog)
        bad = _hostile_files(catalog)
        runs = {
            "good": _predict(model, [good]),
            "catalog": _predict(model, [catalog, Path("/dev/zero")]),
            "prepare": _run(
                [
                    "data",
                    "prepare",
                    str(_as_rsna(catalog, root / "rsna")),
                    "--out",
                    str(root / "prepared"),
                    "--image-size",
                    "64",
                ]
            ),
        }
        if not args.quick:
            large = root / "large"
            _large_dicoms(large, n=8, megapixels=24)
            runs["large-2"] = _predict(model, [large], cores=2)
            runs["large-16"] = _predict(model, [large], cores=16)
            runs["large-16-unbounded"] = _predict(model, [large], cores=16, unbounded=True)
    peak = {name: run["peak_rss_gb"] for name, run in runs.items()}
    summary = (
        f"peak RSS of predict over the bad-input catalog {peak['catalog']:.2f} GB (goal <= {GOAL_GB} GB: "
        f"{'met' if peak['catalog'] <= GOAL_GB else 'missed'}); baseline {peak['good']:.2f} GB; "
        f"data prepare {peak['prepare']:.2f} GB"
    )
    if "large-16" in peak:
        summary += (
            f"; 8 x 24-MP DICOMs with 2 / 8 decoder threads {peak['large-2']:.2f} / {peak['large-16']:.2f} GB "
            f"({peak['large-16'] / peak['large-2']:.2f}x; {peak['large-16-unbounded']:.2f} GB with 8 threads "
            "and no decode budget)"
        )
    finish("bad_input", args, {"goal_gb": GOAL_GB, "hostile_files": bad, "runs": runs}, summary, started)


def _run(argv: list[str], cores: int | None = None, unbounded: bool = False) -> dict:
    """One `raybone` command in a fresh process: exit code, stderr lines, peak RSS (GB), wall time.

    The peak is the child's own VmHWM, read as it exits: the rusage of a forked child also counts its parent's
    peak (Linux carries it across exec), and this parent holds a 1 GiB bomb while building the catalog.
    """
    patch = f"import os; os.cpu_count = lambda: {cores}; " if cores else ""
    if unbounded:  # the control: no decode memory budget
        patch += "import raybone.data.decode as decode; decode._memory.total = 1 << 50; "
    with (
        tempfile.TemporaryFile() as stdout,
        tempfile.TemporaryFile() as stderr,
        tempfile.NamedTemporaryFile("r") as peak,
    ):
        code = (
            f"{patch}import atexit, sys; from pathlib import Path; "
            f"atexit.register(lambda: Path({peak.name!r}).write_text(_hwm())); "
            "_hwm = lambda: next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')); "
            f"from raybone.cli import main; sys.argv = ['raybone'] + {argv!r}; main()"
        )
        began = time.perf_counter()
        exit_code = subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=stderr).returncode
        wall = time.perf_counter() - began
        stdout.seek(0), stderr.seek(0)
        out, lines = stdout.read(), stderr.read().decode(errors="replace").splitlines()
        peak_kb = int(peak.read() or 0)
    return {
        "argv": argv,
        "exit_code": exit_code,
        "stdout_bytes": len(out),
        "stderr_lines": [line for line in lines if line.strip()],
        "peak_rss_gb": round(peak_kb / 2**20, 3),
        "wall_s": round(wall, 1),
    }


def _predict(model: Path, inputs: list[Path], cores: int | None = None, unbounded: bool = False) -> dict:
    result = _run(["predict", str(model), *map(str, inputs), "--format", "csv"], cores, unbounded)
    result |= {"cores_simulated": cores, "decode_budget": not unbounded}
    return result


def _untrained_model(root: Path) -> Path:
    """A model folder exported from an untrained GoogLeNet checkpoint: memory, not accuracy, is measured."""
    import pandas as pd
    import torch
    import yaml

    from raybone.core.model import create_model
    from raybone.experiments import Experiment
    from raybone.modelfolder.export import export_model
    from raybone.spec import load_spec, search_space

    spec = load_spec(search_space("quick"), ["data.image_size=64", "input_size=56"])
    experiment = root / "results" / "untrained"
    checkpoint = experiment / "train" / "trial" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (experiment / "spec.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
    (experiment / "environment.json").write_text(json.dumps({"data_meta": {"image_size": 64}}))
    searched = {name: (p.choices[0] if hasattr(p, "choices") else p.low) for name, p in spec.searched().items()}
    cfg = spec.train_config(searched)
    torch.save(
        {
            "model": create_model(cfg.model, 20).state_dict(),
            "config": cfg.model_dump(),
            "num_classes": 20,
            "iteration": 0,
        },
        checkpoint / "checkpoint.pt",
    )
    pd.DataFrame(
        [{"trial_id": "t", "status": "completed", **searched, "val_rmse": 3.0, "checkpoint_path": str(checkpoint)}]
    ).to_parquet(experiment / "trials.parquet")
    return export_model(Experiment.open(root / "results").best(), root / "model")


def _good_images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (300, 240), dtype=np.uint8)).save(
            folder / f"good{i}.png"
        )


def _hostile_files(folder: Path) -> list[str]:
    from PIL import Image

    for i in range(2):
        (folder / f"huge16-{i}.png").write_bytes(_valid_png16_of_zeros(11999))
    _dicom(folder / "bomb.dcm", np.zeros((1, 1), np.uint16), deflated_pixels=2**30)
    _dicom(folder / "frames.dcm", np.zeros((3, 64, 64), np.uint16))
    os.mkfifo(folder / "pipe.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "scan.gif")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "gif-bytes.png", format="GIF")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / os.fsdecode(b"caf\xe9-\xff.png"))
    return sorted(repr(p.name) for p in folder.iterdir() if not p.name.startswith("good")) + ["/dev/zero"]


def _valid_png16_of_zeros(side: int) -> bytes:
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(bytes(1 + 2 * side)) for _ in range(side)) + deflate.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _dicom(path: Path, pixels: np.ndarray, deflated_pixels: int = 0, rescale: bool = False) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated_pixels else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -100, 2000, 4000
    ds.PixelData = bytes(deflated_pixels) if deflated_pixels else pixels.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())


def _large_dicoms(folder: Path, n: int, megapixels: int) -> None:
    folder.mkdir()
    side = int((megapixels * 1e6) ** 0.5)
    pixels = np.random.default_rng(0).integers(0, 4096, (side, side), dtype=np.uint16)
    for i in range(n):
        _dicom(folder / f"large{i}.dcm", pixels, rescale=True)


def _as_rsna(catalog: Path, source: Path) -> Path:
    """The catalog as an RSNA source: every file an image with a label row (the non-UTF-8 one a stray file)."""
    (source / "images").mkdir(parents=True)
    rows = []
    for path in catalog.iterdir():
        os.symlink(path, source / "images" / path.name)
        if path.stem.isprintable() and path.stem.encode(errors="ignore").decode() == path.stem:
            rows.append(f"{path.stem},{60 + 12 * len(rows)},True")
    (source / "boneage.csv").write_text("id,boneage,male\n" + "\n".join(rows) + "\n")
    return source


if __name__ == "__main__":
    main()
