"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class RayboneError(Exception):
    """Base for every error whose message is meant for the user, not a traceback."""


class DataError(RayboneError):
    """A data source, label file or prepared dataset cannot be used."""


class SpecError(RayboneError):
    """A search-space YAML or a --set override is invalid."""


class WeightsError(RayboneError):
    """Pretrained weights cannot be found or do not fit the model."""
