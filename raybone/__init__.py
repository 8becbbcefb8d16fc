"""raybone: hyperparameter search for bone-age CNNs on Ray Tune + Ray Train."""

__version__ = "0.1.0"
