"""Pick an experiment's best trial and export it as a self-contained model folder.

    weights.safetensors   the network's state dict (safetensors: nothing to unpickle)
    model.ts              TorchScript: preprocessed crops float [B,1,c,c] -> logits [B,C]
    model.onnx            the same network in ONNX (input "crops", output "logits", dynamic batch axis)
    model.json            classes, sizes, preprocessing, TrainConfig, hyperparameters, metrics, provenance
    README.md             the model card

The folder is built beside the target and renamed into place when complete, so a reader never sees half
of one. `raybone.predict` reads it back from weights.safetensors and model.json alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from raybone.analysis import experiment_spec
from raybone.augment import test_crops
from raybone.checkpoint import load_trained_model
from raybone.errors import RayboneError
from raybone.files import Legacy, atomic_folder, check_replaceable, file_sha256
from raybone.data.prepare import cache_root
from raybone.results import METRIC_COLUMNS, experiment_dir, is_uri, latest_experiment, load_trials, location_text, mirror
from raybone.search import best_row
from raybone.spec import METRICS, Spec, TrainConfig

MODEL_FORMAT = "raybone-model"
FORMAT_VERSION = 2  # 2: model.json records the sha256 of each network file
WEIGHTS, TORCHSCRIPT, ONNX, MODEL_JSON, CARD = "weights.safetensors", "model.ts", "model.onnx", "model.json", "README.md"
KIND = "model folder"
_LEGACY = Legacy(MODEL_JSON, f'"{MODEL_FORMAT}"'.encode(), frozenset({WEIGHTS, TORCHSCRIPT, ONNX, MODEL_JSON, CARD}))
ONNX_INPUT, ONNX_SEX, ONNX_OUTPUT = "crops", "sex", "logits"
TOLERANCE = 1e-4  # max |difference| of class probabilities between PyTorch and TorchScript / ONNX
CROPS = ["top-left", "top-right", "bottom-left", "bottom-right", "centre", "centre, flipped horizontally"]
EXPORT_PACKAGES = ("torch", "safetensors", "onnx", "onnxruntime", "onnxscript")
# Chen, Automated Bone Age Classification with Deep Neural Networks: top-1, top-2, RMSE (years).
PAPER = {"VGG16 (paper)": (0.46, 0.70, 1.11), "GoogLeNet (paper)": (0.36, 0.65, 1.25),
         "radiologists (paper)": (0.66, 0.97, 0.65)}


@dataclass
class BestTrial:
    experiment: str
    path: Path  # the experiment folder
    row: pd.Series  # its trials.parquet row
    spec: Spec
    environment: dict
    metric: str
    mode: str

    @property
    def trial_id(self) -> str:
        return str(self.row["trial_id"])

    def hyperparameters(self) -> dict:
        return {name: _plain(self.row.get(name)) for name in self.spec.searched()}

    def metrics(self) -> dict:
        return {name: _plain(self.row.get(name)) for name in METRIC_COLUMNS}

    def train_config(self) -> TrainConfig:
        return self.spec.train_config(self.hyperparameters())

    def checkpoint_dir(self) -> Path:
        location = _plain(self.row.get("checkpoint_path"))
        if not location:
            raise RayboneError(f"trial {self.trial_id} of {self.experiment} saved no checkpoint")
        return resolve_location(location, self.path)

    def summary(self) -> dict:
        """What `raybone best` prints: who, the full config, the validation metrics, the checkpoint."""
        return {"experiment": self.experiment, "trial_id": self.trial_id, "status": _plain(self.row.get("status")),
                "training_iteration": _plain(self.row.get("training_iteration")),
                **self.train_config().model_dump(), **self.metrics(),
                "checkpoint_path": _plain(self.row.get("checkpoint_path"))}


def resolve_location(location, experiment: Path | None = None, recursive: bool = True) -> Path:
    """The one place a location of an experiment (its folder, a checkpoint) becomes a local path.

    A URI (s3://, gs://, file://) is read through pyarrow, as Ray wrote it, into a local mirror under the
    cache (`recursive=False`: the folder's own files only, e.g. an experiment's tables without its checkpoints).
    A local folder that was moved or copied since the search reads its own checkpoints: a stored path is looked
    up inside `experiment` first (the part after the experiment's name), and used as stored only if not there.
    """
    if is_uri(location):
        text = location_text(location)
        name = text.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]  # kept: the Optuna study is named after it
        return mirror(text, cache_root() / "remote" / hashlib.sha256(text.encode()).hexdigest()[:16] / name, recursive)
    path = Path(location)
    if experiment is not None and experiment.name in path.parts:
        below = path.parts[len(path.parts) - 1 - path.parts[::-1].index(experiment.name) + 1:]
        if (experiment.joinpath(*below)).exists():
            return experiment.joinpath(*below)
    return path


def find_best(results_dir, name: str | None = None, metric: str | None = None,
              mode: str | None = None) -> BestTrial:
    """The best trial of experiment `name` (default: the most recent) by `metric` (default: the search's)."""
    name = name or latest_experiment(results_dir)
    path = resolve_location(experiment_dir(results_dir, name), recursive=False)
    trials = load_trials(results_dir, name)
    spec = experiment_spec(path)
    metric = metric or spec.metric
    if metric not in METRICS:
        raise RayboneError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if mode is None:
        mode = spec.mode if metric == spec.metric else ("max" if metric in ("val_top1", "val_top2") else "min")
    if mode not in ("min", "max"):
        raise RayboneError(f"unknown mode {mode!r}; choose min or max")
    row = best_row(trials, metric, mode) if metric in trials.columns else None
    if row is None:
        raise RayboneError(f"no trial of {name!r} reported {metric} ({len(trials)} trials)")
    return BestTrial(name, path, row, spec, _read_json(path / "environment.json"), metric, mode)


def export_model(best: BestTrial, out, force: bool = False) -> Path:
    """Write the model folder `out` for `best`. An earlier model folder there is replaced when the new one is
    complete; anything else is refused (see raybone.files), a model folder holding other files too unless `force`."""
    target = Path(out).resolve()
    check_replaceable(target, KIND, force, _LEGACY)
    model, cfg, num_classes = load_trained_model(best.checkpoint_dir())
    image_size = _image_size(best)
    with atomic_folder(target, KIND, force=force, legacy=_LEGACY) as staging:
        _save_weights(model, staging / WEIGHTS, cfg, num_classes)
        inputs = _sample_inputs(cfg)
        _save_torchscript(model, inputs, staging / TORCHSCRIPT)
        _save_onnx(model, inputs, staging / ONNX)
        meta = model_meta(best, cfg, num_classes, image_size)
        meta["sha256"] = {name: file_sha256(staging / name) for name in (WEIGHTS, TORCHSCRIPT, ONNX)}
        (staging / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / CARD).write_text(model_card(meta))
    return target


# ---------------------------------------------------------------- reading the experiment


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise RayboneError(f"{path}: unreadable ({err})") from None


def _data_meta(best: BestTrial) -> dict:
    """The prepared data's prepared.json, as recorded by the search (or read from the data folder)."""
    meta = best.environment.get("data_meta") or {}
    if not meta and best.environment.get("data_path"):
        meta = _read_json(Path(best.environment["data_path"]) / "prepared.json")
    return meta


def _image_size(best: BestTrial) -> int:
    size = _data_meta(best).get("image_size")
    if size is None:
        raise RayboneError(f"{best.path}: environment.json does not say which image size the model was trained on, "
                           "and the prepared data folder is gone")
    return int(size)


def _plain(value):
    """A JSON-ready Python value from a pandas/numpy one; NaN becomes None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ---------------------------------------------------------------- the files


def _save_weights(model: nn.Module, path: Path, cfg: TrainConfig, num_classes: int) -> None:
    from safetensors.torch import save

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    # save() + write_bytes rather than save_file, which creates the file readable by its owner only.
    path.write_bytes(save(state, metadata={"format": MODEL_FORMAT, "model": cfg.model, "num_classes": str(num_classes)}))


def _sample_inputs(cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
    """The network's inputs for four seeded noise images: their 24 test-time crops [24,1,c,c], preprocessed as
    in training, and with sex_input their sex feature [24] (+1 male, -1 female, 0 unknown)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=generator)
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
            torch.onnx.export(model, tuple(x[:6] for x in inputs), str(path), input_names=names,
                              output_names=[ONNX_OUTPUT], dynamic_shapes=tuple({0: batch} for _ in inputs),
                              dynamo=True, external_data=False, verbose=False)
        except Exception as err:
            raise RayboneError(f"ONNX export failed: {type(err).__name__}: {_one_line(err)}") from err
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
        raise RayboneError(f"{what} export disagrees with PyTorch: class probabilities differ by up to {diff:.3g} "
                           f"(allowed {TOLERANCE:g}); nothing was written")


def model_meta(best: BestTrial, cfg: TrainConfig, num_classes: int, image_size: int) -> dict:
    data = _data_meta(best)
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
        "resize_to": cfg.image_size,
        "sex_input": cfg.sex_input,
        "files": {"weights": WEIGHTS, "torchscript": TORCHSCRIPT, "onnx": ONNX},
        "preprocessing": {
            "decode": "PNG/JPEG to 8-bit grey (ITU-R 601 luminance); DICOM: modality LUT, VOI LUT/window, "
                      "scaled to 0..255, MONOCHROME1 inverted",
            "warp": {"size": [image_size, image_size], "resample": "bilinear (Pillow)", "keep_aspect_ratio": False},
            "resize": None if cfg.image_size == image_size else {
                "size": [cfg.image_size, cfg.image_size], "resample": "bilinear, antialiased (torch interpolate), "
                                                                    "rounded back to uint8"},
            "scale": "uint8 / 255 -> [0, 1]",
            "crops": {"size": cfg.input_size, "order": CROPS,
                      "centre_offset": "floor((image_size - input_size) / 2) from the top and the left"},
            "mean_subtraction": "each crop minus its own mean",
            "aggregation": "softmax of each crop's logits, averaged over the six crops",
            "network_input": {"name": ONNX_INPUT, "shape": ["batch", 1, cfg.input_size, cfg.input_size],
                              "dtype": "float32"},
            **({"network_sex_input": {"name": ONNX_SEX, "shape": ["batch"], "dtype": "float32",
                                      "values": "+1 male, -1 female, 0 unknown (one per crop)"}}
               if cfg.sex_input else {}),
            "network_output": {"name": ONNX_OUTPUT, "shape": ["batch", num_classes], "dtype": "float32"},
        },
        "train_config": cfg.model_dump(),
        "hyperparameters": best.hyperparameters(),
        "metrics": {"split": "val", **best.metrics()},
        "selected_by": {"metric": best.metric, "mode": best.mode},
        "data": {
            "fingerprint": data.get("fingerprint") or best.environment.get("data_fingerprint"),
            "path": best.environment.get("data_path"),
            **{key: data.get(key) for key in ("source", "format", "labels_csv", "num_classes", "seed",
                                               "val_fraction", "counts")},
        },
        "experiment": best.experiment,
        "trial_id": best.trial_id,
        "training_iteration": _plain(row.get("training_iteration")),
        "packages": best.environment.get("packages", {}),
        "export_packages": {name: _version(name) for name in EXPORT_PACKAGES},
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def model_card(meta: dict) -> str:
    metrics, data, counts = meta["metrics"], meta["data"], meta["data"].get("counts") or {}
    synthetic = "demo-atlas" in str(data.get("source") or "")

    def fmt(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    # Of the arg-max class, like the paper's (val_rmse scores the expected age with readout: expected).
    rmse, mae = (next((v for v in (metrics.get(f"{name}_argmax"), metrics.get(name)) if v is not None), None)
                 for name in ("val_rmse", "val_mae"))
    rows = [f"| this model ({meta['model']}, validation) | {fmt(metrics.get('val_top1'))} | {fmt(metrics.get('val_top2'))} "
            f"| {fmt(rmse)} | {fmt(mae)} | {fmt(metrics.get('val_rmse_expected'))} |"]
    rows += [f"| {who} | {top1:.2f} | {top2:.2f} | {rmse:.2f} | | |" for who, (top1, top2, rmse) in PAPER.items()]
    warning = ("\n**This model was trained on the synthetic phantom demo atlas. It has never seen a real radiograph "
               "and its predictions on real images are meaningless.**\n" if synthetic else "")
    size = meta["resize_to"]
    resize = f"\nthen resize to {size}x{size} px (torch bilinear, antialiased, rounded to uint8)," \
        if size != meta["image_size"] else ""
    sex_in = f"and `{ONNX_SEX}` float32 [B], one per crop, " if meta["sex_input"] else ""
    sex_limit = ("The patient's sex is an input (+1 male, -1 female, 0 unknown); `raybone predict` takes it with --sex or --sex-csv."
                 if meta["sex_input"] else "Sex is not an input.")
    hyper = "\n".join(f"- `{k}`: {v:.4g}" if isinstance(v, float) else f"- `{k}`: {v}"
                      for k, v in meta["hyperparameters"].items()) or "- (none searched)"
    return f"""# Bone-age classifier: {meta['model']}, trial {meta['trial_id']} of {meta['experiment']}
{warning}
A {meta['model']} network trained by raybone to classify a pediatric left-hand radiograph into
{meta['num_classes']} whole-year bone-age classes (0 .. {meta['num_classes'] - 1} years).

## Intended use

Research and decision support only: a second opinion for a reader who makes the call.
It is **not a medical device**, has not been clinically validated, and must not be used to diagnose or treat anyone.

## Data

- source: `{data.get('source')}` (format {data.get('format')}), prepared data fingerprint `{data.get('fingerprint')}`
- {counts.get('train', '?')} training and {counts.get('val', '?')} validation radiographs (seeded stratified split,
  validation fraction {data.get('val_fraction')}); class = floor(bone age in months / 12)

## Metrics

Validation split of the data above, six-crop averaging; RMSE and MAE in years, of the arg-max class. The paper's numbers come from its
own data set and split, so they show the scale, not a head-to-head comparison.

| | top-1 | top-2 | RMSE | MAE | RMSE of expected age |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Use it

```bash
raybone predict <this folder> radiograph.png --format json
raybone evaluate <this folder> --data /path/to/labelled/radiographs
```

Preprocessing (done by `raybone predict`; repeat it exactly when calling `model.onnx` or `model.ts` directly):
decode to 8-bit grey, warp to {meta['image_size']}x{meta['image_size']} px (bilinear, aspect ratio not kept),{resize}
scale to [0, 1], take six {meta['input_size']}x{meta['input_size']} crops (four corners, centre, flipped centre),
subtract each crop's mean, run the network on the crops (`{ONNX_INPUT}` float32 [B,1,{meta['input_size']},{meta['input_size']}]
{sex_in}-> `{ONNX_OUTPUT}` [B,{meta['num_classes']}]) and average the six softmax outputs. `model.json` records all of it.

## Training

Hyperparameters found by the search:

{hyper}

Full configuration in `model.json` (`train_config`).

## Limits

- Classes are whole years: class j means a bone age in [j, j+1) years. The "expected age" sum_j p_j j
  is finer than the class but estimates the whole years of age, about half a year below the age itself.
- Trained on {counts.get('train', '?')} images from one source; performance on other scanners, populations,
  age ranges or image qualities is unknown. {sex_limit}
- Images are warped to a square without keeping the aspect ratio, exactly as in training; other preprocessing
  changes the predictions.
- Validation metrics are from the split used to choose this trial among others, so they are optimistic.
"""


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
