"""Helpers shared by the CPU benchmarks in bench/: arguments, timing, paths and the result JSON.

Every benchmark measures both sides of its comparison in the same process, interleaved where it can, and
reports their ratio: absolute numbers from a shared, noisy machine are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = REPO.parent / "shared" / "data"  # real RSNA radiographs beside the checkout, never inside it
PACKAGES = ("raybone", "torch", "torchvision", "kornia", "ray", "optuna", "numpy", "pillow")


def parse_args(
    doc: str | None,
    configure: Callable[[argparse.ArgumentParser], None] | None = None,
    quick_help: str = "a shorter run with the same comparison",
) -> argparse.Namespace:
    """--quick and --out for every benchmark, plus whatever `configure` adds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out", type=Path, help="folder for <name>.json (default bench/results; bench/results/quick with --quick)"
    )
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    # A quick run's figures must never replace the committed full ones beside them.
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    args.load_at_start = _load_average()  # the machine's load when the benchmark began, for the JSON
    return args


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int) -> int:
    """The same intra-op thread count for every side of a comparison."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A fresh local Ray cluster of `num_cpus` CPUs, started as `raybone search` starts one.

    `raybone.tuning.cluster.start_local_ray` tells the cluster's workers their own dashboard, so Ray Train's
    placement-group cleaner finds its controller even where other Ray clusters run on the machine. On top,
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S = 600 (Ray's default: 60): on a starved machine a new worker can need
    over a minute to import torch, and Ray Train then kills and restarts it without end. Neither changes any
    work that is measured.
    """
    import ray

    from raybone.tuning.cluster import start_local_ray

    key = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
    saved = os.environ.get(key)
    os.environ.setdefault(key, "600")
    try:
        start_local_ray(num_cpus)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if saved is None:
            os.environ.pop(key, None)


def machine() -> dict[str, Any]:
    """Where a result came from: enough to tell a 2-core VM from a workstation or a GPU node."""
    info: dict[str, Any] = {
        "cpus": cpu_count(),
        "host_cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "load_average_1m": _load_average(),
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["label"] = f"{info['cpus']}-core CPU" + (f" + {info['gpu']}" if "gpu" in info else "")
    return info


def write_result(name: str, args: argparse.Namespace, results: dict[str, Any], summary: str, started: float) -> Path:
    """bench/results/<name>.json: the summary line, the measurements, the settings and the machine."""
    machine_info = machine()
    payload = {
        "benchmark": name,
        "summary": summary,
        "command": " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": bool(getattr(args, "quick", False)),
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {**machine_info, "load_average_1m_at_start": getattr(args, "load_at_start", None)},
        **results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def finish(name: str, args: argparse.Namespace, results: dict[str, Any], summary: str, started: float) -> None:
    """Write the JSON and print the one-line summary (the last line of the output)."""
    path = write_result(name, args, results, summary, started)
    print(
        f"{summary} [{machine()['label']}, load {getattr(args, 'load_at_start', None)} -> {_load_average()};"
        f" {_relative(path)}]",
        flush=True,
    )


def skip(message: str) -> None:
    """Leave a benchmark that cannot run here (say, no real data) without failing."""
    print(f"skipped: {message}", flush=True)
    raise SystemExit(0)


def shared_folder(name: str) -> Path:
    """../shared/data/<name> beside the checkout, or skip."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        skip(f"real data not found at {folder} (the RSNA folders live in ../shared/data beside the checkout)")
    return folder


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """`with stopwatch() as elapsed: ...; elapsed()` -> seconds since the block began (frozen at its end)."""
    start, end = time.perf_counter(), None

    def elapsed() -> float:
        return (end if end is not None else time.perf_counter()) - start

    try:
        yield elapsed
    finally:
        end = time.perf_counter()


def median(values) -> float:
    return statistics.median(values)


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def fmt_ratio(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)
