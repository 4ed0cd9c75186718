"""Training: the Trainer, the step objective, schedules and checkpoints."""
from __future__ import annotations

__all__ = ["Trainer"]


def __getattr__(name: str):
    # Lazy: importing ucseg_fast.train.schedules / .objective must not pull in the data layer.
    if name == "Trainer":
        from .trainer import Trainer
        return Trainer
    raise AttributeError(name)
