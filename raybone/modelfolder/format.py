"""The model folder that `raybone best --export` writes and `raybone predict` reads.

weights.safetensors   the network's state dict (safetensors: nothing to unpickle)
model.ts              TorchScript: preprocessed crops float [B,1,c,c] -> logits [B,C]
model.onnx            the same network in ONNX (input "crops", output "logits", dynamic batch axis)
model.json            classes, sizes, preprocessing, TrainConfig, hyperparameters, metrics, provenance,
                      the SHA-256 of each network file (format version 2)
README.md             the model card (card.md.j2)
.raybone.json         raybone's marker (see raybone.files)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from raybone.core.catalog import MODELS
from raybone.core.metrics import PAPER
from raybone.data.prepare import from_demo_atlas
from raybone.errors import RayboneError, one_line
from raybone.files import Legacy, read_regular_file

MODEL_FORMAT = "raybone-model"
FORMAT_VERSION = 2  # 2: model.json records the sha256 of each network file
WEIGHTS, TORCHSCRIPT, ONNX, MODEL_JSON, CARD = (
    "weights.safetensors",
    "model.ts",
    "model.onnx",
    "model.json",
    "README.md",
)
NETWORK_FILES = (WEIGHTS, TORCHSCRIPT, ONNX)
ONNX_INPUT, ONNX_SEX, ONNX_OUTPUT = "crops", "sex", "logits"
KIND = "model folder"
LEGACY = Legacy(MODEL_JSON, f'"{MODEL_FORMAT}"'.encode(), frozenset({*NETWORK_FILES, MODEL_JSON, CARD}))
MAX_MODEL_JSON_BYTES = 16 * 2**20


class _Member(BaseModel):
    """One network of a model folder: the folder itself (".") or, in an ensemble, one of its member folders."""

    model_config = ConfigDict(extra="allow")
    folder: str = "."
    model: str
    input_size: StrictInt = Field(ge=8)
    resize_to: StrictInt | None = Field(None, ge=8)  # the trial's re-warp before cropping
    train_config: dict = {}
    sha256: dict[str, str] = {}

    @field_validator("model")
    @classmethod
    def _known(cls, model: str) -> str:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; this raybone knows {', '.join(MODELS)}")
        return model

    @field_validator("folder")
    @classmethod
    def _inside(cls, folder: str) -> str:
        if Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ValueError(f"member folder {folder!r} is not inside the model folder")
        return folder


class _ModelMeta(BaseModel):
    """What predict relies on in model.json; the rest is description. A single network describes itself at the
    top level; an ensemble lists its networks under `members` (each in its own sub-folder)."""

    model_config = ConfigDict(extra="allow")
    format: Literal["raybone-model"]
    format_version: StrictInt = Field(ge=1)
    num_classes: StrictInt = Field(ge=2)
    image_size: StrictInt = Field(ge=8)  # the prepared data's warp
    members: list[_Member] = []

    @model_validator(mode="before")
    @classmethod
    def _one_member_at_the_top(cls, meta: dict) -> dict:
        if isinstance(meta, dict) and "members" not in meta:
            return {**meta, "members": [{key: meta[key] for key in _Member.model_fields if key in meta}]}
        return meta

    @model_validator(mode="after")
    def _consistent(self) -> _ModelMeta:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"model format {self.format_version} is newer than this raybone understands "
                f"({FORMAT_VERSION}); upgrade raybone"
            )
        if not self.members:
            raise ValueError("no network: members is empty")
        for member in self.members:
            side = member.resize_to or self.image_size
            if member.input_size > side:
                raise ValueError(f"input_size {member.input_size} is larger than the image ({side} px)")
            if self.format_version >= 2 and WEIGHTS not in member.sha256:
                raise ValueError(f"sha256 of {WEIGHTS} missing")
        return self


def read_model_meta(model_dir: Path) -> dict:
    """model.json of a model folder, validated: a one-line RayboneError naming the file and the problem."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RayboneError(f"{model_dir}: no such model folder; create one with `raybone best --export {model_dir}`")
    path = model_dir / MODEL_JSON
    if not path.exists():
        raise RayboneError(
            f"{model_dir}: not a raybone model folder ({MODEL_JSON} missing); "
            "create one with `raybone best --export DIR`"
        )
    try:
        meta = json.loads(read_regular_file(path, MAX_MODEL_JSON_BYTES))
    except ValueError as err:
        raise RayboneError(f"{path}: unreadable ({one_line(err)})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise RayboneError(f"{path}: not a raybone model description")
    try:
        return _ModelMeta(**meta).model_dump()
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if "members" not in meta:  # a single network's fields are at the top level
            where = where.removeprefix("members.0.").removeprefix("members.0")
        message = first["msg"].removeprefix("Value error, ")
        raise RayboneError(f"{path}: {where + ': ' if where else ''}{message}") from None


def model_card(meta: dict) -> str:
    """README.md of a model folder, from its model.json."""
    metrics = meta["metrics"]
    # Of the arg-max class, like the paper's (val_rmse scores the expected age with readout: expected).
    rmse, mae = (
        next((v for v in (metrics.get(f"{name}_argmax"), metrics.get(name)) if v is not None), None)
        for name in ("val_rmse", "val_mae")
    )
    return (
        _templates()
        .get_template("card.md.j2")
        .render(
            meta=meta,
            data=meta["data"],
            counts=meta["data"].get("counts") or {},
            paper=PAPER,
            rmse=rmse,
            mae=mae,
            synthetic=from_demo_atlas(meta["data"]),
            onnx={"input": ONNX_INPUT, "sex": ONNX_SEX, "output": ONNX_OUTPUT},
        )
    )


def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader("raybone.modelfolder", ""),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters["fixed"] = lambda value: "n/a" if value is None else f"{value:.2f}"
    environment.filters["short"] = lambda value: f"{value:.4g}" if isinstance(value, float) else str(value)
    return environment
