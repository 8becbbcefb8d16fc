"""Trial checkpoints: plain dicts of tensors and numbers, loaded without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raybone.errors import RayboneError
from raybone.model import create_model
from raybone.spec import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"


def read_checkpoint(folder: str | Path) -> dict:
    """The state a Train worker saved: model, optimizer, schedule, iteration, config, num_classes."""
    path = Path(folder) / CHECKPOINT_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RayboneError(f"{path}: checkpoint not found") from None
    except Exception as err:  # a truncated or foreign file: say which, not a traceback
        raise RayboneError(f"{path}: not a readable raybone checkpoint ({type(err).__name__})") from None


def load_trained_model(folder: str | Path) -> tuple[nn.Module, TrainConfig, int]:
    """The trained network (eval mode, CPU), its TrainConfig and number of classes."""
    state = read_checkpoint(folder)
    cfg = TrainConfig(**state["config"])
    model = create_model(cfg.model, state["num_classes"], weights="none", finetune=cfg.finetune,
                         sex_input=cfg.sex_input)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["num_classes"]
