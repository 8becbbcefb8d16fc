"""Use an exported model folder: predict radiographs, or evaluate on a labelled data set.

A model folder (written by `raybone best --export`) is read from model.json and weights.safetensors only:
nothing is unpickled. Images go through exactly the trial's pipeline: decode to grey, warp to the prepared
data's image_size, resize to the trial's own image size (when its crop_fraction asks for another), six
test-time crops, softmax averaged over the crops.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from raybone.core.inputs import resize, sex_values, test_crops
from raybone.core.metrics import confusion_matrix, readout_metrics
from raybone.data import decode_image, prepare, same_data, warp_image
from raybone.data.decode import IMAGE_SUFFIXES, UNSUPPORTED_SUFFIXES
from raybone.data.prepare import from_demo_atlas
from raybone.data.sources import MAX_LABELS_BYTES, SEX_CODES, parse_sex
from raybone.errors import DataError, RayboneError, one_line, printable
from raybone.files import read_regular_file, write_file_atomically
from raybone.modelfolder.format import (
    MAX_MODEL_JSON_BYTES,
    MODEL_JSON,
    ONNX,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ONNX_SEX,
    WEIGHTS,
    read_model_meta,
)

SPLITS = ("val", "train", "all")
MAX_WEIGHTS_BYTES = 2 * 2**30  # VGG16's weights are 0.5 GiB


@dataclass
class Prediction:
    file: str
    probs: np.ndarray  # [num_classes], averaged over the six crops
    shown: str = ""  # the file as a table shows it: relative to the folder it was found in

    @property
    def ranked(self) -> np.ndarray:
        return np.argsort(-self.probs, kind="stable")  # ties go to the lower class, as with argmax

    @property
    def expected_age_years(self) -> float:
        return float(self.probs.astype(np.float64) @ np.arange(len(self.probs)))

    def record(self) -> dict:
        """One output row: classes are whole years; the expected age is sum_j p_j j."""
        first, second = (int(c) for c in self.ranked[:2])
        return {
            "file": printable(self.file),
            "predicted_years": first,
            "second_years": second,
            "expected_age_years": self.expected_age_years,
            "expected_age_months": self.expected_age_years * 12,
            "probabilities": [float(p) for p in self.probs],
        }


class _TorchNetwork:
    """One network of the model folder in PyTorch, from its safetensors weights."""

    def __init__(self, folder: Path, member: dict, num_classes: int, device: str):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RayboneError("--device cuda: no CUDA GPU is available here; use --device cpu")
        self.device = torch.device(device)
        self.module = _load_weights(folder, member, num_classes).to(self.device)

    def probs(self, images: np.ndarray, sex_code: np.ndarray | None, batch_size: int, size: int, config: dict):
        from raybone.core.engine import predict_images, to_layout

        return predict_images(
            to_layout(self.module, bool(config.get("channels_last", False))),
            images,
            size,
            config["input_size"],
            self.device,
            sex_code=sex_code,
            batch_size=batch_size,
            amp=bool(config.get("amp", False)),
        )


class _OnnxNetwork:
    """One network of the model folder through onnxruntime: the same six crops and softmax, without torch."""

    def __init__(self, folder: Path, member: dict):
        import onnxruntime

        data = _checked(folder / ONNX, member, MAX_WEIGHTS_BYTES)
        try:
            self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors on a bad graph
            raise RayboneError(f"{folder / ONNX}: cannot load ({one_line(err)})") from None

    def probs(self, images: np.ndarray, sex_code: np.ndarray | None, batch_size: int, size: int, config: dict):
        out = []
        for start in range(0, len(images), batch_size):
            crops = test_crops(resize(images[start : start + batch_size], size), config["input_size"])
            feeds = {ONNX_INPUT: np.ascontiguousarray(crops.reshape(-1, *crops.shape[2:]))}
            if sex_code is not None:
                feeds[ONNX_SEX] = np.tile(sex_values(sex_code[start : start + batch_size]), 6)
            (logits,) = self.session.run([ONNX_OUTPUT], feeds)
            exp = np.exp(logits - logits.max(-1, keepdims=True))
            out.append((exp / exp.sum(-1, keepdims=True)).reshape(6, len(crops[0]), -1).mean(0))
        return np.concatenate(out)


BACKENDS = ("auto", "onnx", "torch")


class Predictor:
    """An exported model on `device` (one network, or an ensemble averaging its members' probabilities), with
    the preprocessing it was trained with.

    backend "onnx" runs each member's model.onnx through onnxruntime, without importing torch (seconds off every
    command); "torch" its safetensors weights in PyTorch. "auto" takes ONNX on the CPU where every member has it,
    PyTorch otherwise.
    """

    def __init__(self, model_dir, device: str = "cpu", backend: str = "auto"):
        if device not in ("cpu", "cuda"):
            raise RayboneError(f"unknown device {device!r}; choose cpu or cuda")
        if backend not in BACKENDS:
            raise RayboneError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.path = Path(model_dir)
        self.meta = read_model_meta(self.path)
        self.image_size = self.meta["image_size"]  # the prepared data's warp size
        self.num_classes = self.meta["num_classes"]
        members = self.meta["members"]
        self.configs = [{**m["train_config"], "input_size": m["input_size"]} for m in members]
        self.sizes = [m.get("resize_to") or self.image_size for m in members]
        self.backend = self._choose(backend, device)
        self.networks = [
            _OnnxNetwork(self.path / m["folder"], m)
            if self.backend == "onnx"
            else _TorchNetwork(self.path / m["folder"], m, self.num_classes, device)
            for m in members
        ]
        self.config = self.configs[0]  # readout and batch size: an ensemble's members share the search's
        self.sex_input = any(bool(c.get("sex_input", False)) for c in self.configs)

    def _choose(self, backend: str, device: str) -> str:
        if backend == "onnx" and device != "cpu":
            raise RayboneError("--backend onnx runs on the CPU; use --backend torch with --device cuda")
        if backend == "auto":
            have_onnx = all((self.path / m["folder"] / ONNX).is_file() for m in self.meta["members"])
            return "onnx" if device == "cpu" and have_onnx else "torch"
        return backend

    @property
    def model(self):
        """The first network's torch module (backend "torch" only)."""
        return self.networks[0].module

    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    def preprocess(self, path) -> np.ndarray:
        """uint8 [image_size, image_size], as prepare() stores it; DataError '<path>: <reason>' if unusable."""
        return warp_image(decode_image(path), self.image_size)

    def predict_arrays(
        self, images: np.ndarray, sex_code: np.ndarray | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """Class probabilities [N, C] for warped uint8 images [N, S, S], as the trial's validation computed them.

        sex_code (1 male, 0 female, -1 unknown) is used by models trained with sex_input; unknown by default.
        """
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise RayboneError(f"expected images [N, {self.image_size}, {self.image_size}], got {list(images.shape)}")
        if not len(images):
            return np.zeros((0, self.num_classes), dtype=np.float32)
        sex_code = np.full(len(images), -1) if sex_code is None else sex_code
        probs = [
            network.probs(
                images,
                sex_code if config.get("sex_input") else None,
                batch_size or int(config.get("eval_batch_size", 64)),
                size,
                config,
            )
            for network, config, size in zip(self.networks, self.configs, self.sizes, strict=True)
        ]
        return np.mean(probs, axis=0)

    def predict_files(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        on_error: Callable[[str], None] | None = None,
        advance: Callable[[int], None] | None = None,
        sex_codes: dict[Path, int] | None = None,
    ) -> Iterator[Prediction]:
        """Predict file by file in batches; an unusable file goes to on_error('<path>: <reason>') and is skipped.

        sex_codes maps each file to 1 (male), 0 (female) or -1 (unknown), for models trained with sex_input.
        """
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for start in range(0, len(paths), batch_size):
                batch = paths[start : start + batch_size]
                loaded = list(pool.map(self._load, batch))
                good = [(path, pixels) for path, (pixels, _) in zip(batch, loaded) if pixels is not None]
                for _, problem in loaded:
                    if problem and on_error:
                        on_error(problem)
                if good:
                    sex = np.array([(sex_codes or {}).get(path, -1) for path, _ in good])
                    probs = self.predict_arrays(np.stack([pixels for _, pixels in good]), sex, batch_size)
                    yield from (Prediction(str(path), p) for (path, _), p in zip(good, probs))
                if advance:
                    advance(len(batch))

    def _load(self, path: Path) -> tuple[np.ndarray | None, str]:
        try:
            return self.preprocess(path), ""
        except DataError as err:
            return None, str(err)
        except Exception as err:  # a decoder bug on one odd file must not stop the others
            return None, f"{path}: cannot decode ({type(err).__name__}: {one_line(err)})"


def _checked(path: Path, member: dict, limit: int) -> bytes:
    """The file's bytes, once its sha256 matches model.json (where model.json records one)."""
    data = read_regular_file(path, limit)
    expected = member["sha256"].get(path.name)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise RayboneError(f"{path}: sha256 does not match {MODEL_JSON} (modified or corrupt); export the model again")
    return data


def _load_weights(folder: Path, member: dict, num_classes: int):
    from safetensors import SafetensorError
    from safetensors.torch import load

    from raybone.core.model import create_model

    path = folder / WEIGHTS
    try:
        state = load(_checked(path, member, MAX_WEIGHTS_BYTES))
    except (SafetensorError, ValueError) as err:
        raise RayboneError(f"{path}: cannot read weights ({one_line(err)})") from None
    config = member["train_config"]
    model = create_model(
        member["model"],
        num_classes,
        weights="none",
        finetune=config.get("finetune", "full"),
        sex_input=bool(config.get("sex_input", False)),
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RayboneError(
            f"{path}: does not fit a {member['model']} with {num_classes} classes ({str(err).splitlines()[0]})"
        ) from None
    return model.eval()


# ---------------------------------------------------------------- inputs


def find_images(inputs: Sequence) -> tuple[list[Path], list[str]]:
    """Files named on the command line as they are; folders searched recursively for radiographs.

    Returns (files, problems): a missing input is a problem '<path>: <reason>', not a reason to stop.
    In folders, .png .jpg .jpeg .dcm .dicom files count, and extension-less files with a DICOM marker; other
    image files (.gif, .tif, ...) are problems, so that none is left out silently.
    """
    files, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if not p.is_dir() and not p.name.startswith("."))
            files += [p for p in found if _is_radiograph(p)]
            problems += [
                f"{p}: {p.suffix.lower()} images are not read; raybone reads PNG, JPEG and DICOM"
                for p in found
                if p.suffix.lower() in UNSUPPORTED_SUFFIXES
            ]
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def _is_radiograph(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix or not path.is_file():  # never open a FIFO or a device to look for a DICOM marker
        return False
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


# ---------------------------------------------------------------- evaluate


def evaluate(
    model_dir,
    data: str,
    split: str | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    backend: str = "auto",
) -> dict:
    """Metrics and confusion matrix of the model on a prepared data set or a labelled source.

    A source is prepared with the model's image size, classes, seed and validation fraction, so the data the
    model was trained on (or a copy of it) gets the same content and split back; then the default split is its
    validation split. On other data the default is all of it.
    """
    if split is not None and split not in SPLITS:
        raise RayboneError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    predictor = Predictor(model_dir, device, backend)
    trained_on = predictor.meta.get("data", {})
    prepared = prepare(
        data,
        image_size=predictor.image_size,
        num_classes=predictor.num_classes,
        seed=trained_on.get("seed") or 0,
        val_fraction=trained_on.get("val_fraction") or 0.25,
    )
    if prepared.images.shape[1] != predictor.image_size:
        raise DataError(
            f"{prepared.path}: prepared at {prepared.images.shape[1]} px but the model needs "
            f"{predictor.image_size} px; pass the source folder instead"
        )
    trained_here = same_data(prepared.meta, trained_on)
    split = split or ("val" if trained_here else "all")
    chosen = np.ones(len(prepared.labels), dtype=bool) if split == "all" else (prepared.is_train == (split == "train"))
    labels = prepared.labels[chosen]
    if not len(labels):
        raise DataError(f"{prepared.path}: the {split} split is empty")
    if labels.max() >= predictor.num_classes:
        raise DataError(
            f"{prepared.path}: labels reach {labels.max()} years but the model has {predictor.num_classes} classes"
        )
    probs = predictor.predict_arrays(prepared.images[chosen], prepared.sex_code[chosen], batch_size)
    metrics = readout_metrics(probs, labels, predictor.config.get("readout", "argmax"))
    return {
        "model": str(predictor.path),
        "experiment": predictor.meta.get("experiment"),
        "trial_id": predictor.meta.get("trial_id"),
        "data": str(prepared.path),
        "fingerprint": prepared.fingerprint,
        "same_data_as_training": trained_here,
        "split": split,
        "images": len(labels),
        "readout": predictor.config.get("readout", "argmax"),
        "metrics": metrics,
        "classes": list(range(predictor.num_classes)),
        "confusion_matrix": confusion_matrix(probs.argmax(1), labels, predictor.num_classes).tolist(),
        "warning": None if trained_here or from_demo_atlas(prepared.meta) else demo_atlas_note(predictor),
    }


EVALUATION_FORMAT = "raybone-evaluation"


def check_evaluation_file(path: Path) -> None:
    """Refuse to replace a file that is not an earlier `raybone evaluate --json` output."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    try:
        earlier = json.loads(read_regular_file(path, MAX_MODEL_JSON_BYTES))
    except (RayboneError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != EVALUATION_FORMAT:
        raise RayboneError(f"{path}: exists and was not written by raybone evaluate; choose another --json file")


def write_evaluation(result: dict, path: Path) -> None:
    """The result of evaluate() as JSON, replacing only an earlier evaluation, never half-written."""
    check_evaluation_file(path)
    write_file_atomically(path, json.dumps({"format": EVALUATION_FORMAT, **result}, indent=2) + "\n")


# ---------------------------------------------------------------- predict, for the command line


def sex_codes(files: Sequence[Path], sex: str | None, sex_csv: Path | None) -> dict[Path, int] | None:
    """Each file's sex code from --sex (one value for all) or a sidecar CSV (file, sex); None if neither."""
    if sex is None and sex_csv is None:
        return None
    if sex is not None:
        code = SEX_CODES[parse_sex({"sex": sex})]
        if code < 0:
            raise RayboneError(f"--sex {sex!r}: expected male or female (M/F)")
        return dict.fromkeys(files, code)
    data = read_regular_file(sex_csv, MAX_LABELS_BYTES)
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:  # UnicodeDecodeError included
        raise RayboneError(f"{sex_csv}: cannot read the sex CSV ({one_line(err)})") from None
    if "file" not in table.columns or not {"sex", "male"} & set(table.columns):
        raise RayboneError(f"{sex_csv}: needs columns 'file' and 'sex' (M/F) or 'male' (True/False)")
    by_name = {Path(row["file"]).name: SEX_CODES[parse_sex(row)] for row in table.to_dict("records")}
    return {path: by_name.get(path.name, -1) for path in files}


def predict_inputs(
    model_dir,
    inputs: Sequence,
    device: str = "cpu",
    batch_size: int = 32,
    console: Console | None = None,
    sex: str | None = None,
    sex_csv: Path | None = None,
    backend: str = "auto",
) -> tuple[list[Prediction], int, Predictor]:
    """Predict every radiograph in `inputs` (files or folders), with a progress bar on `console`.

    Each unusable input is one line 'error: <file>: <reason>' on `console`; the rest still run.
    Returns (predictions, number of failed inputs, the predictor).
    """
    console = console or Console(stderr=True)
    if batch_size < 1:
        raise RayboneError(f"--batch-size must be at least 1, got {batch_size}")
    predictor = Predictor(model_dir, device, backend)
    files, problems = find_images(inputs)
    if not files and not problems:
        raise RayboneError(
            f"no radiographs ({', '.join(IMAGE_SUFFIXES)} or DICOM) found in {', '.join(map(str, inputs))}"
        )
    _warn_if_trained_on_the_demo_atlas(predictor, files, console)
    failures = 0
    codes = sex_codes(files, sex, sex_csv)  # read even where unused: a bad value or file is still the user's mistake
    if codes is not None and not predictor.sex_input:
        note = f"note: {printable(model_dir)} takes no sex input; --sex and --sex-csv change nothing"
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    if predictor.sex_input and codes is None:
        raise RayboneError(
            f"{model_dir}: this model takes the patient's sex as an input; "
            "pass --sex male|female or --sex-csv FILE (columns file, sex)"
        )

    def report(problem: str) -> None:
        nonlocal failures
        failures += 1
        console.print(f"error: {printable(problem)}", markup=False, highlight=False, soft_wrap=True)

    for problem in problems:
        report(problem)
    bar = Progress(
        TextColumn("Predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar:
        task = bar.add_task("predict", total=len(files))
        predictions = list(
            predictor.predict_files(
                files, batch_size, on_error=report, advance=lambda n: bar.advance(task, n), sex_codes=codes
            )
        )
    roots = [Path(item) for item in inputs if Path(item).is_dir()]
    for prediction in predictions:
        path = Path(prediction.file)
        root = next((root for root in roots if path.is_relative_to(root)), None)
        prediction.shown = printable(path.relative_to(root) if root else path)
    return predictions, failures, predictor


def _warn_if_trained_on_the_demo_atlas(predictor: Predictor, files: Sequence[Path], console: Console) -> None:
    """Once: a model of the synthetic phantom atlas says nothing true about real radiographs."""
    source = str((predictor.meta.get("data") or {}).get("source") or "")
    if (note := demo_atlas_note(predictor)) and any(not Path(f).resolve().is_relative_to(Path(source)) for f in files):
        console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)


def demo_atlas_note(predictor: Predictor) -> str | None:
    if from_demo_atlas(predictor.meta.get("data") or {}):
        return (
            f"{printable(predictor.path)} was trained on the synthetic phantom demo atlas, not on radiographs: its "
            "predictions on real radiographs are meaningless"
        )
    return None


def predictions_json(predictions: Sequence[Prediction]) -> str:
    return json.dumps([p.record() for p in predictions], indent=2)


def predictions_table(predictions: Sequence[Prediction], num_classes: int) -> pd.DataFrame:
    """One row per image: file, predicted/second class, expected age, then p_0 .. p_{C-1}."""
    columns = ["file", "predicted_years", "second_years", "expected_age_years", "expected_age_months"]
    rows = []
    for prediction in predictions:
        record = prediction.record()
        probs = record.pop("probabilities")
        rows.append({**record, **{f"p_{j}": p for j, p in enumerate(probs)}})
    return pd.DataFrame(rows, columns=columns + [f"p_{j}" for j in range(num_classes)])


def predictions_csv(predictions: Sequence[Prediction], num_classes: int) -> str:
    """predictions_table as CSV, file names safe from spreadsheet formulas."""
    table = predictions_table(predictions, num_classes)
    table["file"] = table["file"].map(csv_text)
    return table.to_csv(index=False)


def csv_text(text: str) -> str:
    """A text cell a spreadsheet shows as text: a leading = + - @ (or tab, CR) would start a formula."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
