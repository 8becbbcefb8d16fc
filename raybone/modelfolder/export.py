"""`raybone best --export`: an experiment's best trial as a self-contained model folder (see format.py).

The folder is built beside the target and renamed into place when complete, so a reader never sees half of
one; TorchScript and ONNX are each checked against the PyTorch network before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raybone.core.augment import test_crops
from raybone.core.engine import predict_trained
from raybone.core.metrics import readout_metrics
from raybone.errors import RayboneError, one_line
from raybone.experiments import BestTrial
from raybone.files import atomic_folder, check_replaceable, file_sha256
from raybone.modelfolder.format import (
    CARD,
    FORMAT_VERSION,
    KIND,
    LEGACY,
    MODEL_FORMAT,
    MODEL_JSON,
    NETWORK_FILES,
    ONNX,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_SEX,
    TORCHSCRIPT,
    WEIGHTS,
    model_card,
)
from raybone.spec import TrainConfig

TOLERANCE = 1e-4  # max |difference| of class probabilities between PyTorch and TorchScript / ONNX
CROPS = ["top-left", "top-right", "bottom-left", "bottom-right", "centre", "centre, flipped horizontally"]
EXPORT_PACKAGES = ("torch", "safetensors", "onnx", "onnxruntime", "onnxscript")
# From the prepared data's prepared.json into model.json: where it came from, its settings, and what identifies it
# when its source is copied (raybone.data.same_data).
DATA_KEYS = (
    *("source", "labels_csv", "format", "image_size", "num_classes", "seed", "val_fraction", "counts"),
    *("data_version", "images_sha256", "content_sha256"),
)


def check_export_folder(out, force: bool = False) -> Path:
    """`out`, resolved, if export_model may write there; else the refusal, before any work is shown or done."""
    target = Path(out).resolve()
    check_replaceable(target, KIND, force, LEGACY)
    return target


def export_model(best: BestTrial | list[BestTrial], out, force: bool = False) -> Path:
    """Write the model folder `out` for `best`, or for a list of trials an ensemble of them (each in a member
    folder; predictions average their probabilities). An earlier model folder there is replaced when the new one
    is complete; anything else is refused (see raybone.files), a model folder holding other files too unless
    `force`."""
    members = best if isinstance(best, list) else [best]
    target = check_export_folder(out, force)
    image_size = members[0].image_size()
    with atomic_folder(target, KIND, force=force, legacy=LEGACY) as staging:
        metas = []
        for index, member in enumerate(members, start=1):
            folder = staging if len(members) == 1 else staging / f"member-{index}"
            folder.mkdir(exist_ok=True)
            model, cfg, num_classes = member.load_model()
            onnx_exporter = _save_network(model, cfg, num_classes, folder)
            metas.append(
                {
                    **model_meta(member, cfg, num_classes, image_size),
                    "onnx_exporter": onnx_exporter,
                    "folder": folder.relative_to(staging).as_posix(),
                    "sha256": {name: file_sha256(folder / name) for name in NETWORK_FILES},
                }
            )
        meta = metas[0] if len(members) == 1 else _ensemble_meta(members, metas)
        (staging / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / CARD).write_text(model_card(meta))
    return target


def ensemble_members(candidates: list[BestTrial], k: int) -> list[BestTrial]:
    """`k` of `candidates` (best first) for an ensemble: the best, then each time the candidate whose validation
    errors (expected age minus true age) correlate least with those already chosen. Errors that do not move
    together are what averaging cancels."""
    if k > len(candidates):
        raise RayboneError(f"--top {k} is more than the {len(candidates)} candidates of --from-top")
    data = candidates[0].prepared_data()
    held_out = ~data.is_train
    errors = [
        _validation_probs(c, data) @ np.arange(data.meta["num_classes"]) - data.labels[held_out] for c in candidates
    ]
    chosen = [0]
    while len(chosen) < k:
        rest = [i for i in range(len(candidates)) if i not in chosen]
        chosen.append(min(rest, key=lambda i: max(_correlation(errors[i], errors[j]) for j in chosen)))
    return [candidates[i] for i in chosen]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() and b.std() else 1.0


def _validation_probs(member: BestTrial, data) -> np.ndarray:
    """A trial's six-crop class probabilities on its validation split, as its validation computed them."""
    held_out = ~data.is_train
    model, cfg, _ = member.load_model()
    return predict_trained(model, cfg, data.images[held_out], data.sex_code[held_out], "cpu")


def _ensemble_meta(members: list[BestTrial], metas: list[dict]) -> dict:
    """model.json of an ensemble: what the members share at the top, each member's own under `members`, and the
    ensemble's validation metrics (its members' probabilities averaged on the search's validation split)."""
    data = members[0].prepared_data()
    held_out = ~data.is_train
    probs = np.mean([_validation_probs(member, data) for member in members], axis=0)
    readout = members[0].train_config().readout
    metrics = {f"val_{k}": v for k, v in readout_metrics(probs, data.labels[held_out], readout).items()}
    shared = (
        "format",
        "format_version",
        "classes",
        "class_unit",
        "num_classes",
        "image_size",
        "data",
        "experiment",
        "packages",
        "export_packages",
        "exported",
    )
    return {
        **{key: metas[0][key] for key in shared},
        "kind": "ensemble",
        "model": "ensemble of " + ", ".join(meta["model"] for meta in metas),
        "preprocessing": {
            "each member": "its own, as in members[i].preprocessing",
            "aggregation": "the members' six-crop probabilities, averaged",
        },
        "metrics": {"split": "val", **metrics},
        "selected_by": {**metas[0]["selected_by"], "members": len(members)},
        "members": [{key: value for key, value in meta.items() if key not in shared} for meta in metas],
    }


def _save_network(model: nn.Module, cfg: TrainConfig, num_classes: int, folder: Path) -> str:
    """weights.safetensors, model.ts and model.onnx of one network, the last two checked against PyTorch; returns
    the ONNX exporter used."""
    _save_weights(model, folder / WEIGHTS, cfg, num_classes)
    inputs = _sample_inputs(cfg)
    _save_torchscript(model, inputs, folder / TORCHSCRIPT)
    return _save_onnx(model, inputs, folder / ONNX)


def _save_weights(model: nn.Module, path: Path, cfg: TrainConfig, num_classes: int) -> None:
    from safetensors.torch import save

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    # save() + write_bytes rather than save_file, which creates the file readable by its owner only.
    path.write_bytes(
        save(state, metadata={"format": MODEL_FORMAT, "model": cfg.model, "num_classes": str(num_classes)})
    )


def _sample_inputs(cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """The network's inputs for four seeded noise images: their 24 test-time crops [24,1,c,c], preprocessed as
    in training, and with sex_input their sex feature [24] (+1 male, -1 female, 0 unknown)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, cfg.resize_to, cfg.resize_to), dtype=torch.uint8, generator=generator)
    crops = test_crops(images, cfg.input_size).flatten(0, 1)
    return (crops, torch.tensor([1.0, -1.0, 0.0, 1.0]).repeat(6)) if cfg.sex_input else (crops,)


def _save_torchscript(model: nn.Module, inputs: tuple, path: Path) -> None:
    # Traced on one image's six crops, checked on all 24: the batch axis stays free.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; ONNX is the durable format
        traced = torch.jit.trace(model, tuple(x[:6] for x in inputs), check_trace=False)
        torch.jit.save(traced, str(path))
        _check_agreement("TorchScript", _softmax(model(*inputs)), _softmax(torch.jit.load(str(path))(*inputs)))


def _save_onnx(model: nn.Module, inputs: tuple, path: Path) -> str:
    """Write model.onnx, checked against PyTorch on all 24 crops; returns the exporter that wrote it.

    PyTorch's TorchScript-based exporter goes first: it writes GoogLeNet in under a second where the
    torch.export-based one takes 7-9 s on 2 cores (most of `best --export`), and onnxruntime runs both graphs
    equally fast. It is deprecated upstream and will be removed, so where it is gone, fails, or writes a file that
    does not pass the check, the durable exporter writes the file instead.
    """
    feeds = dict(zip(_onnx_inputs(len(inputs)), inputs))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _softmax(model(*inputs))
        try:
            _export_onnx(model, feeds, path, dynamo=False)
            _check_onnx(path, feeds, expected)
            return "torchscript"
        except Exception as err:  # whatever stops the deprecated path, the durable one may still export the network
            first = f"{type(err).__name__}: {one_line(err)}"
        try:
            _export_onnx(model, feeds, path, dynamo=True)
        except Exception as err:
            raise RayboneError(
                f"ONNX export failed: {type(err).__name__}: {one_line(err)} "
                f"(and before it, with the TorchScript-based exporter: {first})"
            ) from err
        _check_onnx(path, feeds, expected)
    return "torch.export"


def _export_onnx(model: nn.Module, feeds: dict[str, torch.Tensor], path: Path, dynamo: bool) -> None:
    """Export with one of PyTorch's two exporters, traced on one image's six crops; the batch axis stays free."""
    sample = tuple(x[:6] for x in feeds.values())
    io_names = {"input_names": list(feeds), "output_names": [ONNX_OUTPUT]}
    if dynamo:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in sample)
        torch.onnx.export(
            model, sample, str(path), **io_names, dynamic_shapes=shapes, dynamo=True, external_data=False, verbose=False
        )
        return
    axes = {name: {0: "batch"} for name in (*feeds, ONNX_OUTPUT)}
    with _native_stdout_silenced():
        torch.onnx.export(model, sample, str(path), **io_names, dynamic_axes=axes, dynamo=False)


def _check_onnx(path: Path, feeds: dict[str, torch.Tensor], expected: np.ndarray) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([ONNX_OUTPUT], {name: x.numpy() for name, x in feeds.items()})
    _check_agreement("ONNX", expected, _softmax(torch.from_numpy(logits)))


@contextlib.contextmanager
def _native_stdout_silenced():
    """File descriptor 1 to /dev/null: where the TorchScript-based exporter fails (VGG16 at 64 px: an adaptive
    pooling it cannot translate), its C++ logger prints the whole graph there, whatever `verbose` says."""
    if sys.stdout:  # None under pythonw and some service runners
        sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _onnx_inputs(count: int) -> list[str]:
    return [ONNX_INPUT, ONNX_SEX][:count]


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return logits.float().softmax(-1).numpy()


def _check_agreement(what: str, expected: np.ndarray, got: np.ndarray) -> None:
    diff = float(np.abs(expected - got).max()) if expected.shape == got.shape else math.inf
    if not diff < TOLERANCE:
        raise RayboneError(
            f"{what} export disagrees with PyTorch: class probabilities differ by up to {diff:.3g} "
            f"(allowed {TOLERANCE:g}); nothing was written"
        )


def model_meta(best: BestTrial, cfg: TrainConfig, num_classes: int, image_size: int) -> dict:
    data, environment = best.data_meta(), best.experiment.environment
    return {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.model,
        "classes": list(range(num_classes)),
        "class_unit": "years (class j = bone age in [j, j+1) years)",
        "num_classes": num_classes,
        "input_size": cfg.input_size,
        "image_size": image_size,
        "resize_to": cfg.resize_to,
        "sex_input": cfg.sex_input,
        "files": {"weights": WEIGHTS, "torchscript": TORCHSCRIPT, "onnx": ONNX},
        "preprocessing": {
            "decode": "PNG/JPEG to 8-bit grey (ITU-R 601 luminance); DICOM: modality LUT, VOI LUT/window, "
            "scaled to 0..255, MONOCHROME1 inverted",
            "warp": {"size": [image_size, image_size], "resample": "bilinear (Pillow)", "keep_aspect_ratio": False},
            "resize": None
            if cfg.resize_to == image_size
            else {
                "size": [cfg.resize_to, cfg.resize_to],
                "resample": "bilinear, antialiased (torch interpolate), rounded back to uint8",
            },
            "scale": "uint8 / 255 -> [0, 1]",
            "crops": {
                "size": cfg.input_size,
                "order": CROPS,
                "centre_offset": "floor((image_size - input_size) / 2) from the top and the left",
            },
            "mean_subtraction": "each crop minus its own mean",
            "aggregation": "softmax of each crop's logits, averaged over the six crops",
            "network_input": {
                "name": ONNX_INPUT,
                "shape": ["batch", 1, cfg.input_size, cfg.input_size],
                "dtype": "float32",
            },
            **(
                {
                    "network_sex_input": {
                        "name": ONNX_SEX,
                        "shape": ["batch"],
                        "dtype": "float32",
                        "values": "+1 male, -1 female, 0 unknown (one per crop)",
                    }
                }
                if cfg.sex_input
                else {}
            ),
            "network_output": {"name": ONNX_OUTPUT, "shape": ["batch", num_classes], "dtype": "float32"},
        },
        "train_config": cfg.model_dump(),
        "hyperparameters": best.hyperparameters(),
        "metrics": {"split": "val", **best.metrics()},
        "selected_by": {"metric": best.metric, "mode": best.mode, "scope": best.scope},
        "data": {
            "fingerprint": data.get("fingerprint") or environment.get("data_fingerprint"),
            "path": str(folder.absolute()) if (folder := best.data_folder()) else None,
            **{key: data.get(key) for key in DATA_KEYS},  # null where older prepared data did not record it
        },
        "experiment": best.experiment.name,
        "trial_id": best.trial_id,
        "iteration": best.iteration,
        "checkpoint_scope": best.scope,
        "packages": environment.get("packages", {}),
        "export_packages": {name: _version(name) for name in EXPORT_PACKAGES},
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
