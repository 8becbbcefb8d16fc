"""Trial checkpoints: plain dicts of tensors and numbers, loaded without unpickling arbitrary objects.

model, optimizer, schedule   state dicts
iteration                    SGD iterations done
config                       the TrainConfig's fields
num_classes, metrics         the classes and the last validation metrics
"""

from __future__ import annotations

from pathlib import Path

from raybone.errors import RayboneError

CHECKPOINT_FILE = "checkpoint.pt"


def write_checkpoint(state: dict, folder: str | Path) -> None:
    import torch  # here, not above: readers of CHECKPOINT_FILE need not load torch

    torch.save(state, Path(folder) / CHECKPOINT_FILE)


def read_checkpoint(folder: str | Path) -> dict:
    """The state a Train worker saved (see the module's docstring)."""
    import torch

    path = Path(folder) / CHECKPOINT_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RayboneError(f"{path}: checkpoint not found") from None
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise RayboneError(f"{path}: not a readable raybone checkpoint ({type(err).__name__})") from None
