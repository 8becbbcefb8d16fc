"""The experiment spec: one validated object from the YAML search space, through Tune, to the worker.

A search-space file has a `train` block whose entries are either fixed values or distributions:

    train:
      model: googlenet                                   # fixed
      lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}
      finetune: {choices: [full, head]}

Every trial resolves the distributions to one `TrainConfig`, which is what the Train workers see.
"""

from __future__ import annotations

import difflib
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raybone.core.catalog import LOSSES, MODELS
from raybone.errors import SpecError, one_line

if TYPE_CHECKING:
    from raybone.data import PreparedData

# Every validation metric a trial reports, with the direction that makes it better. val_rmse / val_mae score
# the spec's readout; the _argmax / _expected columns score each readout by name.
METRICS = {
    "val_rmse": "min",
    "val_mae": "min",
    "val_mae_months": "min",
    "val_top1": "max",
    "val_top2": "max",
    "val_rmse_argmax": "min",
    "val_mae_argmax": "min",
    "val_rmse_expected": "min",
    "val_mae_expected": "min",
}
DEFAULT_SPACE = "quick"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainConfig(_Strict):
    """Everything one trial trains with; the hyperparameter names match YAML, Parquet and docs."""

    model: str = "googlenet"
    weights: str = "none"  # none | imagenet | path to a torchvision state dict
    finetune: Literal["full", "head"] = "full"
    loss: str = "l2ce"
    lr: float = Field(1e-4, gt=0, le=1)
    decay_steps: int = Field(500, ge=1)  # lr is halved every decay_steps iterations
    l2_weight: float = Field(1.0, ge=0)  # weight of sum_j p_j (j - y)^2 in L2CE
    weight_decay: float = Field(0.1, ge=0)  # the paper's regularization strength, on the class layer
    batch_size: int = Field(32, ge=1)
    iterations: int = Field(5000, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    input_size: int = Field(224, ge=32)  # side of the random / test-time crops
    crop_fraction: float = Field(0.875, gt=0.5, le=1)  # crop side / image side: 224 of 256 in the paper
    sex_input: bool = False  # the patient's sex joins the final layer's features
    contrast: float = Field(0.0, ge=0, lt=1)  # random brightness, contrast and gamma within +-contrast
    class_balance: Literal["none", "sampling", "loss"] = "none"  # rare years drawn or weighted more
    readout: Literal["argmax", "expected"] = "argmax"  # which age val_rmse / val_mae score
    amp: bool = True  # bf16 autocast on GPUs that support it; on CPUs with bf16 instructions, for training steps only
    channels_last: bool = True  # NHWC: faster convolutions on tensor cores, and with oneDNN on CPUs
    compile: bool = False  # torch.compile the model (minutes of compile time per trial)
    # Exponential moving average of the weights, validated, checkpointed and exported in their place: each step
    # the average moves (1 - ema) of the way to the new weights. 0 = off.
    ema: float = Field(0.0, ge=0, lt=1)

    @property
    def resize_to(self) -> int:
        """The side a trial re-warps the prepared images to before cropping: input_size / crop_fraction."""
        return round(self.input_size / self.crop_fraction)

    @field_validator("model", "loss")
    @classmethod
    def _known(cls, v: str, info) -> str:
        known = {"model": MODELS, "loss": LOSSES}[info.field_name]
        if v not in known:
            raise ValueError(f"unknown {info.field_name} {v!r}; choose one of {', '.join(known)}")
        return v


class Range(_Strict):
    distribution: Literal["uniform", "loguniform", "int", "logint"] = "uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.distribution.startswith("log") and self.low <= 0:
            raise ValueError(f"a {self.distribution} range needs low > 0, got {self.low}")
        return self


class Choice(_Strict):
    choices: list[Any] = Field(min_length=1)


Param = Range | Choice | Any  # Any: a fixed value


class DataSpec(_Strict):
    source: str = "demo"  # "demo" (the built-in phantom atlas), a source folder/CSV, or a prepared folder
    format: Literal["auto", "rsna", "dha", "manifest"] = "auto"
    labels: str | None = None
    image_size: int = Field(256, ge=32)  # images are warped to image_size x image_size once, at prepare time
    num_classes: int = Field(20, ge=2)
    val_fraction: float = Field(0.25, gt=0, lt=1)


PERTURBED = ("lr", "l2_weight", "weight_decay", "contrast")  # what Population Based Training may change mid-run


class Scheduler(_Strict):
    type: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = Field(500, ge=1)  # asha: iterations every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha
    # pbt: every perturbation_interval iterations (0: every validation) the worst quantile_fraction of the
    # trials copy a better trial's checkpoint and configuration and perturb the searched PERTURBED values.
    perturbation_interval: int = Field(0, ge=0)
    # pbt: iterations before the first exploit. Scores from before the curves separate are noise (in the search
    # benchmark every trial scores as the median predictor for 500 iterations), and a copy made on them is a coin toss.
    burn_in_period: int = Field(0, ge=0)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    resample_probability: float = Field(0.25, ge=0, le=1)
    # pbt: Ray's asynchronous PBT lets each trial compare itself, at its own interval, with the others' last
    # scores, so in a small population an exploit may never come; synchronous waits for all (pausing each).
    synchronous: bool = False


class Searcher(_Strict):
    """Optuna's sampler: TPE (default), a Gaussian process, CMA-ES, random or quasi-random (Sobol), seeded."""

    type: Literal["tpe", "gp", "cmaes", "random", "qmc"] = "tpe"


class Resources(_Strict):
    num_workers: int = Field(1, ge=1)  # Train workers per trial (DDP when > 1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions share a GPU between small trials
    max_failures: int = Field(1, ge=-1)  # restarts of a failed trial, from its last checkpoint (-1: no limit)
    # Trials training at once. Unset: as many as the cluster's present CPUs/GPUs fit. Set it on an
    # autoscaling cluster: trials then wait for the nodes the autoscaler adds.
    max_concurrent_trials: int | None = Field(None, ge=1)


class Spec(_Strict):
    seed: int = 0
    metric: Literal[tuple(METRICS)] = "val_rmse"  # type: ignore[valid-type]
    mode: Literal["min", "max"] | None = None  # default: the metric's own direction (METRICS)
    num_samples: int = Field(8, ge=1)
    data: DataSpec = DataSpec()
    train: dict[str, Any] = {}
    # Configurations the searcher tries first (e.g. a published recipe), each naming every searched
    # hyperparameter: the search then starts from what is known to work instead of from random draws.
    start_from: list[dict[str, Any]] = []
    scheduler: Scheduler = Scheduler()
    searcher: Searcher = Searcher()
    # Checkpoints each trial keeps besides its latest: its best ones by the metric, so the best model a trial ever
    # reached survives the trial's later (worse) iterations.
    keep_checkpoints: int = Field(2, ge=1)
    # Where the search is also logged: Ray Tune's MLflow and W&B callbacks (TensorBoard files are always written
    # beside the trials). MLflow and W&B read their usual settings from the environment (MLFLOW_TRACKING_URI,
    # WANDB_PROJECT, WANDB_MODE, ...).
    loggers: list[Literal["mlflow", "wandb"]] = []
    resources: Resources = Resources()

    @field_validator("train", mode="before")
    @classmethod
    def _train_params(cls, train: Any) -> dict[str, Param]:
        if not isinstance(train, dict):
            raise ValueError("expected a mapping of hyperparameters")
        parsed = {name: _parse_param(name, value) for name, value in train.items()}
        for corner in _corners(parsed):
            _validated(TrainConfig, corner)  # every config the searcher can sample must be valid
        return parsed

    @model_validator(mode="after")
    def _mode_follows_the_metric(self) -> Spec:
        better = METRICS[self.metric]
        if self.mode is None:
            self.mode = better
        elif self.mode != better:
            raise ValueError(
                f"mode: {self.mode} contradicts metric {self.metric}, which is better when "
                f"{'lower' if better == 'min' else 'higher'}; drop mode or set it to {better}"
            )
        return self

    @model_validator(mode="after")
    def _pbt_has_something_to_perturb(self) -> Spec:
        if self.scheduler.type == "pbt" and not set(PERTURBED) & set(self.searched()):
            raise ValueError(
                f"scheduler.type pbt needs one of {', '.join(PERTURBED)} searched (it perturbs them "
                f"mid-run); this search searches {', '.join(self.searched()) or 'nothing'}"
            )
        return self

    @model_validator(mode="after")
    def _scheduler_acts_within_the_iterations(self) -> Spec:
        iterations, scheduler = self.fixed().get("iterations"), self.scheduler
        if iterations is None:
            return self
        if scheduler.type == "asha" and scheduler.grace_period > iterations:
            raise ValueError(
                f"scheduler.grace_period ({scheduler.grace_period}) exceeds train.iterations ({iterations})"
            )
        if scheduler.type == "pbt" and scheduler.burn_in_period >= iterations:
            raise ValueError(
                f"scheduler.burn_in_period ({scheduler.burn_in_period}) is not below train.iterations ({iterations}):"
                " PBT would exploit nothing"
            )
        return self

    @model_validator(mode="after")
    def _start_points_in_space(self) -> Spec:
        searched = self.searched()
        for i, point in enumerate(self.start_from):
            where = f"start_from.{i}"
            if unknown := sorted(set(point) - set(searched)):
                raise ValueError(
                    f"{where}: {', '.join(unknown)} not searched (fixed in train or unknown); a start "
                    f"point names the searched hyperparameters only: {', '.join(searched) or 'none'}"
                )
            if missing := sorted(set(searched) - set(point)):
                raise ValueError(f"{where}: name every searched hyperparameter; missing {', '.join(missing)}")
            for name, value in point.items():
                if not _within(searched[name], value):
                    raise ValueError(f"{where}.{name}: {value!r} is outside the searched {_shown(searched[name])}")
            _validated(TrainConfig, {**self.fixed(), **point}, prefix=where)
        return self

    def searched(self) -> dict[str, Range | Choice]:
        return {k: v for k, v in self.train.items() if isinstance(v, (Range, Choice))}

    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.train.items() if not isinstance(v, (Range, Choice))}

    def train_config(self, sampled: dict[str, Any]) -> TrainConfig:
        """The config one trial trains with: fixed values, then the searcher's samples."""
        return TrainConfig(**{**self.fixed(), **sampled})

    @property
    def iterations(self) -> int:
        return self.train_config(_first_values(self.searched())).iterations

    def prepare_data(self) -> PreparedData:
        """The data this spec trains on, prepared once (or found in the cache)."""
        from raybone.data import prepare

        return prepare(
            self.data.source,
            format=self.data.format,
            labels=self.data.labels,
            image_size=self.data.image_size,
            num_classes=self.data.num_classes,
            seed=self.seed,
            val_fraction=self.data.val_fraction,
        )


def _parse_param(name: str, value: Any) -> Param:
    if name not in TrainConfig.model_fields:
        raise ValueError(f"unknown key {name!r}; known: {', '.join(TrainConfig.model_fields)}")
    if isinstance(value, dict):
        return _validated(Choice if "choices" in value else Range, value, prefix=name)
    return value


def _validated(model: type[BaseModel], values: dict, prefix: str = "") -> Any:
    """Build `model`, turning its ValidationError into a ValueError that names the key."""
    try:
        return model(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"]])
        message = first["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}" if where else message) from None


def _first_values(searched: dict[str, Range | Choice]) -> dict[str, Any]:
    return {k: (v.choices[0] if isinstance(v, Choice) else _cast(k, v.low)) for k, v in searched.items()}


def _corners(train: dict[str, Param]) -> list[dict[str, Any]]:
    """Fixed values with each searched parameter at each of its extremes or choices."""
    base = {k: v for k, v in train.items() if not isinstance(v, (Range, Choice))}
    searched = {k: v for k, v in train.items() if isinstance(v, (Range, Choice))}
    base.update(_first_values(searched))
    corners = [base]
    for name, param in searched.items():
        values = param.choices if isinstance(param, Choice) else [param.low, param.high]
        corners += [{**base, name: _cast(name, value)} for value in values]
    return corners


def _within(param: Range | Choice, value: Any) -> bool:
    if isinstance(param, Choice):
        return value in param.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) and param.low <= value <= param.high


def _shown(param: Range | Choice) -> str:
    return f"choices {param.choices}" if isinstance(param, Choice) else f"range [{param.low}, {param.high}]"


def _cast(name: str, value: float) -> Any:
    return int(value) if TrainConfig.model_fields[name].annotation is int else value


def search_space(config: str | Path) -> Path | Traversable:
    """A search-space file: `config` itself if it is a file, else the space packaged with raybone by that name
    (`quick`, `paper`, `gpu`, `rsna`, with or without `.yaml`)."""
    if Path(config).is_file():
        return Path(config)
    packaged = files("raybone.search_spaces")
    name = Path(config).name.removesuffix(".yaml") + ".yaml"
    if Path(config).parent == Path(".") and packaged.joinpath(name).is_file():
        return packaged.joinpath(name)
    known = ", ".join(sorted(p.name.removesuffix(".yaml") for p in packaged.iterdir() if p.name.endswith(".yaml")))
    raise SpecError(f"{config}: no such search-space file, and no packaged space of that name (packaged: {known})")


def load_spec(path: str | Path | Traversable, overrides: list[str] = ()) -> Spec:
    """Read and validate a search-space YAML, applying `key.sub=value` overrides first."""
    path = Path(path) if isinstance(path, str) else path
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such search-space file") from None
    return parse_spec(text, str(path), overrides)


def parse_spec(text: str, origin: str, overrides: list[str] = ()) -> Spec:
    """Validate a search space given as YAML text; `origin` names it in errors."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{origin}: not valid YAML ({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, origin)
    try:
        return Spec(**raw)
    except ValidationError as err:
        raise SpecError(f"{origin}: {_describe(err)}") from None


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML, as an experiment's spec.yaml holds it."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_changes(before: Spec, after: Spec, *, training_only: bool = False) -> list[str]:
    """'train.ema: 0.0 -> 0.99' for each setting that differs, except where the trials run (resources) and what
    they are logged to. `training_only`: the data, its split's seed and the fixed train settings, what a trial's
    score depends on besides its hyperparameters."""
    old, new = (flat_settings(s, exclude={"resources", "loggers"}) for s in (before, after))
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if training_only:  # a searched hyperparameter dumps as its range, no fixed setting; the seed splits the data
        searched = {k for k in changed if isinstance(old.get(k), dict) or isinstance(new.get(k), dict)}
        changed = [k for k in changed if k.startswith(("data.", "train.", "seed")) and k not in searched]
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in changed]


def flat_settings(spec: Spec, exclude: set[str] = frozenset()) -> dict:
    """The spec's settings by dotted key down to one hyperparameter (a searched one's range is one value), the
    train section with its defaults filled in."""
    settings = spec.model_dump(mode="json", exclude=set(exclude))
    settings["train"] = TrainConfig().model_dump(mode="json") | settings["train"]
    flat = {}
    for key, value in settings.items():
        inner = value.items() if isinstance(value, dict) else [(None, value)]
        flat |= {key if name is None else f"{key}.{name}": setting for name, setting in inner}
    return flat


def _apply_override(raw: dict, item: str, origin: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr.high=1e-3")
    keys = key.split(".")
    if keys[0] not in Spec.model_fields and keys[0] in TrainConfig.model_fields:
        keys.insert(0, "train")  # hyperparameters may be named bare: --set lr.high=1e-3
    if keys[0] not in Spec.model_fields:  # a typo here, reported as the YAML's, sent users to a file they never wrote
        near = difflib.get_close_matches(keys[0], [*Spec.model_fields, *TrainConfig.model_fields], n=1)
        raise SpecError(f"--set {item!r}: no key {keys[0]!r}" + (f"; did you mean {near[0]}?" if near else ""))
    node = raw
    for part in keys[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {item!r}: {'.'.join(keys[:-1])} in {origin} is a fixed value, not a mapping")
    node[keys[-1]] = yaml.safe_load(text)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("Range", "Choice", "function")))
    message = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"
