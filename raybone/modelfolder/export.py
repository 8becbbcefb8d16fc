"""`raybone best --export`: an experiment's best trial as a self-contained model folder (see format.py).

The folder is built beside the target and renamed into place when complete, so a reader never sees half of
one; TorchScript and ONNX are each checked against the PyTorch network before anything is written.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raybone.core.augment import test_crops
from raybone.errors import RayboneError, one_line
from raybone.experiments import BestTrial
from raybone.experiments.experiment import plain
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


def export_model(best: BestTrial, out, force: bool = False) -> Path:
    """Write the model folder `out` for `best`. An earlier model folder there is replaced when the new one is
    complete; anything else is refused (see raybone.files), a model folder holding other files too unless `force`."""
    target = Path(out).resolve()
    check_replaceable(target, KIND, force, LEGACY)
    model, cfg, num_classes = best.load_model()
    image_size = best.image_size()
    with atomic_folder(target, KIND, force=force, legacy=LEGACY) as staging:
        _save_weights(model, staging / WEIGHTS, cfg, num_classes)
        inputs = _sample_inputs(cfg)
        _save_torchscript(model, inputs, staging / TORCHSCRIPT)
        _save_onnx(model, inputs, staging / ONNX)
        meta = model_meta(best, cfg, num_classes, image_size)
        meta["sha256"] = {name: file_sha256(staging / name) for name in NETWORK_FILES}
        (staging / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / CARD).write_text(model_card(meta))
    return target


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


def _save_onnx(model: nn.Module, inputs: tuple, path: Path) -> None:
    import onnxruntime

    names = _onnx_inputs(len(inputs))
    batch = torch.export.Dim("batch")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                tuple(x[:6] for x in inputs),
                str(path),
                input_names=names,
                output_names=[ONNX_OUTPUT],
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as err:
            raise RayboneError(f"ONNX export failed: {type(err).__name__}: {one_line(err)}") from err
        expected = _softmax(model(*inputs))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([ONNX_OUTPUT], {name: x.numpy() for name, x in zip(names, inputs)})
    _check_agreement("ONNX", expected, _softmax(torch.from_numpy(logits)))


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
    row = best.row
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
        "selected_by": {"metric": best.metric, "mode": best.mode},
        "data": {
            "fingerprint": data.get("fingerprint") or environment.get("data_fingerprint"),
            "path": environment.get("data_path"),
            **{
                key: data.get(key)
                for key in ("source", "format", "labels_csv", "num_classes", "seed", "val_fraction", "counts")
            },
        },
        "experiment": best.experiment.name,
        "trial_id": best.trial_id,
        "iteration": plain(row.get("iteration")),
        "packages": environment.get("packages", {}),
        "export_packages": {name: _version(name) for name in EXPORT_PACKAGES},
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None
