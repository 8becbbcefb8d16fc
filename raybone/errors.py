"""User-facing errors, and the two rules every message and every printed file name follows.

The CLI prints a RayboneError's message on one line and exits non-zero. File names come from the user's disk
and may hold anything: bytes that are not UTF-8 (Python carries them as surrogate escapes), newlines, terminal
escape codes. `printable` is applied wherever a name leaves raybone (messages, tables, CSV, JSON, Parquet).
"""

import re


class RayboneError(Exception):
    """Base for every error whose message is meant for the user, not a traceback."""


class DataError(RayboneError):
    """A data source, label file or prepared dataset cannot be used."""


class SpecError(RayboneError):
    """A search-space YAML or a --set override is invalid."""


class MismatchError(RayboneError):
    """Weights or a checkpoint that do not fit the model or its optimizer. Unlike a failed download or read, trying
    again meets it again: a trial that fails with one is not trained again when Tune retries it."""


class WeightsError(RayboneError):
    """Pretrained weights cannot be found or do not fit the model."""


class WeightsMismatchError(WeightsError, MismatchError):
    """Pretrained weights that are no state dict, or one that does not fit the model."""


# Control characters, and lone surrogates: how Python carries file-name bytes that are not UTF-8.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text) -> str:
    """`text` as one line of valid UTF-8: undecodable bytes and control characters become `\\xNN`."""
    return _UNPRINTABLE.sub(_escape, str(text))


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a surrogate escape stands for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"


def one_line(err, limit: int = 400) -> str:
    """An exception's (or any text's) message on one line. Libraries' messages span lines (a YAML position, each
    DICOM plugin's reason, a Ray traceback); a long one keeps its start and its end, where the cause usually is."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-limit // 2 :]}"
