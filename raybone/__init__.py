"""raybone: hyperparameter search for bone-age CNNs on Ray Tune + Ray Train.

The Python API, for notebooks and scripts (each loads what it needs when called):

    import raybone
    experiment = raybone.search("quick", name="demo", num_samples=4, lr={"distribution": "loguniform",
                                                                         "low": 1e-4, "high": 1e-2})
    experiment.trials(), experiment.best()                  # pandas / the best model, as `raybone best`
    raybone.export(experiment.best(), "model/")              # as `raybone best --export model/`
    experiment = raybone.load_experiment("results/demo")    # an experiment folder, or a URI
    model = raybone.load_model("model/")                     # a folder from `raybone best --export`
    model.predict(["hand.png", pixels])                      # a pandas table, one row per image
"""

__version__ = "0.1.0"

_API = ("search", "export", "load_experiment", "load_model", "Model")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    # Lazily (PEP 562): `import raybone` stays free of torch and Ray, and a layer that reads __version__
    # does not load the API, which imports every layer.
    if name in _API:
        from raybone import api

        return getattr(api, name)
    raise AttributeError(f"module 'raybone' has no attribute {name!r}")
