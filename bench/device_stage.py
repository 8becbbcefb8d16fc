"""Carry what raybone's GPU benchmarks need to a lent device machine, one bundle per call.

A lent machine's image (Python 3.12 with PyTorch, the workplace's device notes) has no Ray, Optuna, Kornia or
pydantic and no ../shared/data, and reaches no network. One call carries at most 64 MiB with the working tree,
but the Ray wheel alone is 79 MB and rsna-100 57 MB, so they travel in bundles over consecutive calls to one
warm machine (it goes back 30 s after a call, and what it held is lost). Here, once (about a minute; pip reaches
its registry):

    python bench/device_stage.py pack        # .stage/1 .. .stage/N: the wheels first, rsna-100 (one zip) last

It prints the calls to make. On the device, one call per bundle, back to back, each naming its bundle in carry:

    python3 bench/device_stage.py install    # every call: checks what has arrived (rc 2 until all has); once
                                             # the wheels have, installs them and raybone into /tmp/site and
                                             # starts Ray there once; once the data has, unzips it beside the tree

and in the last call, `install && ... bench/quality.py --paper-scale --device cuda --work /tmp/paper --out $OUT`.
The wheels are those in bench/device-requirements.txt: everything `ray[default,tune,train]`, Optuna, Kornia,
pydicom and pydantic need that the image lacks (torch stays the image's).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from _common import REPO, SHARED_DATA  # stdlib-only at import: runs on the device before any wheel is in

STAGE = REPO / ".stage"  # git-ignored: only a bundle named in a call's carry travels
CACHE = STAGE / "cache"
SITE = Path("/tmp/site")  # on the device
JOINED = Path("/tmp/stage-files")
DATA_SETS = ("rsna-100",)
CALL_LIMIT = 64 * 2**20  # what one call may carry, the working tree included
MARGIN = 2 * 2**20  # room for files added after packing; also the smallest piece worth splitting a file for
PYTHON = "3.12"  # the device image's
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64")
PLATFORMS += ("manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64")
PLATFORMS += ("manylinux1_x86_64",)
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check")
# Starts Ray as `raybone search` does (dashboard included), so a missing dependency shows before the long call.
SMOKE = (
    "import kornia, optuna, pydantic, pydicom, torch, ray, raybone.api; from raybone.tuning.cluster import "
    "start_local_ray; start_local_ray(); print('Ray', ray.__version__, ray.cluster_resources()); ray.shutdown()"
)


def pack(python: str) -> None:
    wheels, data = _download(python), _zip_data()
    for old in STAGE.glob("[0-9]*"):  # earlier bundles; the folder is this script's own
        shutil.rmtree(old)
    capacity = CALL_LIMIT - _tree_bytes() - MARGIN
    # The wheels fill the first bundles, so the call before the last installs them and starts Ray.
    bundles = _fill(wheels, capacity) + _fill([data], capacity)
    manifest = {"pack": uuid.uuid4().hex, "bundles": len(bundles), "python": python, "files": {}}
    manifest["commit"] = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    for number, pieces in enumerate(bundles, start=1):
        for source, start, size in pieces:
            part = f"{number}/{source.name}.{start}"
            digest = _copy_range(source, STAGE / part, start, size)
            manifest["files"].setdefault(source.name, []).append({"part": part, "bytes": size, "sha256": digest})
    for number in range(1, len(bundles) + 1):
        (STAGE / str(number) / "manifest.json").write_text(json.dumps({**manifest, "bundle": number}, indent=1))
    _print_calls(len(bundles), capacity)


def install() -> int:
    """Check the bundles here, install what has fully arrived; 0 once everything has, 2 while some is missing."""
    manifest, present = _manifest()
    missing = sorted(set(range(1, manifest["bundles"] + 1)) - present)
    print(f"bundles here: {sorted(present)}; missing: {missing or 'none'} (packed at {manifest['commit'][:7]})")
    if 1 in missing and present:
        print("bundle 1 is gone: the machine was given back between calls; start again from bundle 1")
    arrived = {name: parts for name, parts in manifest["files"].items() if _arrived(parts, present)}
    wheels = {name: parts for name, parts in manifest["files"].items() if name.endswith(".whl")}
    if wheels.keys() <= arrived.keys():
        _install_wheels(wheels, manifest["pack"])
    if "data.zip" in arrived:
        _unzip_data(arrived["data.zip"], manifest["pack"])
    return 2 if missing else 0


def _download(python: str) -> list[Path]:
    """The pinned wheels for the device's Python, largest first, in an emptied cache (one version of each)."""
    folder = CACHE / python
    shutil.rmtree(folder, ignore_errors=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pins = REPO / "bench" / "device-requirements.txt"
    _run(
        [*PIP, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python]
        + ["--implementation", "cp", *platforms, "-d", str(folder), "-r", str(pins)],
        f"downloading the wheels of {pins}",
    )
    return sorted(folder.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True)


def _zip_data() -> Path:
    """The benchmark's data sets as one stored zip: one file travels faster, and counts fewer bytes, than 11,000."""
    archive = CACHE / "data.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        for name in DATA_SETS:
            if not (SHARED_DATA / name).is_dir():
                raise SystemExit(f"{SHARED_DATA / name} not found: the benchmark's radiographs must be there to travel")
            for path in sorted((SHARED_DATA / name).rglob("*")):
                out.write(path, path.relative_to(SHARED_DATA))
    return archive


def _fill(files: list[Path], capacity: int) -> list[list[tuple[Path, int, int]]]:
    """(file, start, bytes) pieces in bundles of at most `capacity` bytes, in order, splitting a file that does
    not fit what is left."""
    bundles: list[list[tuple[Path, int, int]]] = [[]]
    room = capacity
    for source in files:
        size, start = source.stat().st_size, 0
        while start < size:
            if room < min(MARGIN, size - start):
                bundles.append([])
                room = capacity
            take = min(room, size - start)
            bundles[-1].append((source, start, take))
            start, room = start + take, room - take
    return [bundle for bundle in bundles if bundle]


def _copy_range(source: Path, dest: Path, start: int, size: int) -> str:
    with source.open("rb") as src:
        src.seek(start)
        chunk = src.read(size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(chunk)
    return hashlib.sha256(chunk).hexdigest()


def _tree_bytes() -> int:
    """What travels with every call besides a bundle: tracked and untracked, not ignored, files."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum((REPO / name).stat().st_size for name in listing.split("\0") if name and (REPO / name).is_file())


def _print_calls(count: int, capacity: int) -> None:
    run = (
        "PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/quality.py --paper-scale --device cuda "
        "--work /tmp/paper --out $OUT 2>&1 | tee $OUT/log"
    )
    print(f"{count} bundles in {STAGE}, each at most {capacity / 2**20:.1f} MiB. On the device, back to back:")
    for number in range(1, count + 1):
        command = "python3 bench/device_stage.py install" + (f" && set -o pipefail && {run}" if number == count else "")
        print(f'  run(carry=[".stage/{number}"], command="{command}", timeout_s={600 if number == count else 120})')


def _manifest() -> tuple[dict, set[int]]:
    """One pack's manifest and the numbers of its bundles here; the wrong Python or mixed packs stop."""
    manifests = {int(p.parent.name): json.loads(p.read_text()) for p in STAGE.glob("[0-9]*/manifest.json")}
    if not manifests:
        raise SystemExit(f"no bundle in {STAGE}: name .stage/1 in the call's carry (`pack` it on the CPU side first)")
    last = manifests[max(manifests)]
    if last["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
        raise SystemExit(f"the bundles hold wheels for Python {last['python']}, this is {sys.version.split()[0]}")
    stale = sorted(n for n, m in manifests.items() if m["pack"] != last["pack"])
    if stale:
        raise SystemExit(f"bundles {stale} are from another pack: carry every bundle of one pack, from bundle 1")
    return last, set(manifests)


def _arrived(parts: list[dict], present: set[int]) -> bool:
    """Whether every piece of a file is here, whole; a piece cut short or changed on the way stops."""
    if any(int(part["part"].split("/")[0]) not in present for part in parts):
        return False
    for part in parts:
        path = STAGE / part["part"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            raise SystemExit(f"{path} did not arrive whole: carry bundle {part['part'].split('/')[0]} again")
    return True


def _join(name: str, parts: list[dict]) -> Path:
    JOINED.mkdir(parents=True, exist_ok=True)
    with (JOINED / name).open("wb") as out:
        for part in parts:
            out.write((STAGE / part["part"]).read_bytes())
    return JOINED / name


def _install_wheels(wheels: dict[str, list[dict]], pack_id: str) -> None:
    """The wheels into SITE and Ray started once per pack; raybone from this tree every call (it may have moved)."""
    stamp = SITE / ".raybone-stage"
    done = stamp.is_file() and stamp.read_text() == pack_id
    install = [*PIP, "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(SITE)]
    if not done:
        joined = [str(_join(name, parts)) for name, parts in wheels.items()]
        _run([*install, *joined], "installing the carried wheels")
    _run([*install, "--no-build-isolation", str(REPO)], "installing raybone from the carried tree")
    if not done:
        _run([sys.executable, "-c", SMOKE], "importing the packages and starting Ray", PYTHONPATH=str(SITE))
        stamp.write_text(pack_id)


def _unzip_data(parts: list[dict], pack_id: str) -> None:
    """Each data set at ../shared/data; one that this script did not put there is left alone."""
    for name in DATA_SETS:
        stamp = SHARED_DATA / f".{name}.staged"
        if (SHARED_DATA / name).exists() and not stamp.exists():
            print(f"{SHARED_DATA / name} was there before: left as it is")
        elif not (stamp.exists() and stamp.read_text() == pack_id):
            shutil.rmtree(SHARED_DATA / name, ignore_errors=True)  # an earlier or cut-short copy, this script's own
            SHARED_DATA.mkdir(parents=True, exist_ok=True)
            stamp.write_text("")  # claimed before the first file lands
            with zipfile.ZipFile(_join("data.zip", parts)) as zipped:
                zipped.extractall(SHARED_DATA, [m for m in zipped.namelist() if m.startswith(f"{name}/")])
            stamp.write_text(pack_id)
            print(f"{name} at {SHARED_DATA / name}")


def _run(command: list[str], what: str, **env: str) -> None:
    if subprocess.run(command, env={**os.environ, **env}).returncode != 0:
        raise SystemExit(f"{what} failed: see the messages above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["pack", "install"], help="pack here, install on the device")
    parser.add_argument("--python", default=PYTHON, help="the device's Python version, for the wheels (pack)")
    args = parser.parse_args()
    if args.step == "pack":
        pack(args.python)
    else:
        sys.exit(install())


if __name__ == "__main__":
    main()
