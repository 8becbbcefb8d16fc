"""The Python API behind `import raybone` (see the package docstring): each call loads what it needs."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from raybone.experiments import Experiment
    from raybone.spec import Spec


def search(
    spec: str | Path | Spec = "quick",
    *,
    name: str | None = None,
    storage: str | PurePath = "results",
    address: str | None = None,
    warm_start: str | None = None,
    **overrides: Any,
) -> Experiment:
    """Run a search and return its experiment. `spec` is a packaged space's name, a YAML file or a Spec;
    `overrides` set its keys as `raybone search --set` does: `num_samples=4`, `lr={"low": ..., "high": ...}`,
    and nested keys with a double underscore (`scheduler__type="none"`, `data__source="/data/rsna"`)."""
    from datetime import datetime

    import yaml

    from raybone.experiments import Experiment
    from raybone.spec import Spec, dump_spec, parse_spec
    from raybone.tuning.run import run_search, search_spec

    sets = [
        f"{key.replace('__', '.')}={yaml.safe_dump(value, default_flow_style=True).strip()}"
        for key, value in overrides.items()
    ]
    if isinstance(spec, Spec):
        spec, label = parse_spec(dump_spec(spec), "spec", sets), "spec"
    else:
        spec, label = search_spec(spec, sets, storage), Path(str(spec)).stem
    name = name or f"{label}-{datetime.now():%Y%m%d-%H%M%S}"
    run_search(spec, name=name, results_dir=storage, address=address, warm_start=warm_start)
    return Experiment.open(storage, name)


def export(best, folder: str | Path, force: bool = False) -> Path:
    """Write `best` (a BestTrial, or a list of them for an ensemble) as a model folder, as `raybone best --export`."""
    from raybone.modelfolder.export import export_model

    return export_model(best, folder, force=force)


def load_experiment(location: str | PurePath, name: str | None = None) -> Experiment:
    """An experiment: `location` is its folder (or a URI of it), or with `name` the storage that holds it."""
    from raybone.experiments import Experiment
    from raybone.experiments.storage import is_uri, location_text

    if name is None and is_uri(location):
        base, _, query = location_text(location).partition("?")
        base, _, name = base.rstrip("/").rpartition("/")
        location = base + (f"?{query}" if query else "")
    elif name is None:
        location, name = Path(location).absolute().parent, Path(location).name
    return Experiment.open(location, name)


def load_model(folder: str | Path, device: str = "cpu", backend: str = "auto") -> Model:
    """An exported model folder (one network or an ensemble), ready to predict; backend auto | onnx | torch as
    `raybone predict --backend`."""
    return Model(folder, device, backend)


class Model:
    """A model folder from `raybone best --export`, on `device`."""

    def __init__(self, folder: str | Path, device: str = "cpu", backend: str = "auto"):
        from raybone.modelfolder.predict import Predictor

        self._predictor = Predictor(folder, device, backend)
        self.meta: dict = self._predictor.meta  # model.json

    def predict(self, images, sex: list[str] | str | None = None) -> pd.DataFrame:
        """One row per image: file (or its position), predicted_years, second_years, expected age (years and
        months), and p_0 .. p_{C-1}. `images` are files (PNG, JPEG, DICOM) or 2-D arrays of grey pixels;
        `sex` (male/female, one for all or one per image) for models trained with sex input."""
        import numpy as np

        from raybone.data import warp_image
        from raybone.data.sources import SEX_CODES, parse_sex
        from raybone.modelfolder.predict import Prediction, predictions_table

        predictor = self._predictor
        warped = [
            predictor.preprocess(i)
            if isinstance(i, (str, Path))
            else warp_image(np.asarray(i, np.uint8), predictor.image_size)
            for i in images
        ]
        sexes = [sex] * len(warped) if sex is None or isinstance(sex, str) else list(sex)
        codes = np.array([SEX_CODES[parse_sex({"sex": s or ""})] for s in sexes])
        probs = predictor.predict_arrays(np.stack(warped), codes) if warped else []
        predictions = [
            Prediction(str(image) if isinstance(image, (str, Path)) else str(index), p)
            for index, (image, p) in enumerate(zip(images, probs, strict=True))
        ]
        return predictions_table(predictions, predictor.num_classes)
