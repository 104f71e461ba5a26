"""Hooks that `finetune.loop.fit` calls; Ray reporting, checkpoint writing, TensorBoard and fault
injection plug in here instead of as flags inside the loop (which never imports Ray).

Order: `on_fit_start` after a checkpoint is restored; per batch `on_train_batch_end` after the
optimiser step and schedule update; per epoch `on_epoch_end` after evaluation, with the epoch's
metrics (`state.epoch` already counts the epoch); `on_fit_end` with the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class TrainState:
    """Everything a callback may read, and what a checkpoint must hold to continue exactly.

    `epoch` counts completed epochs (0 before the first). Callbacks stop training by setting
    `should_stop = True` and a `stop_reason` (e.g. "diverged", "early_stop").
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    config: Dict[str, Any]
    epoch: int = 0
    global_step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    static_metrics: Dict[str, Any] = field(default_factory=dict)
    running_loss: Optional[float] = None  # the epoch's mean training loss so far, set every log_interval steps
    should_stop: bool = False
    stop_reason: Optional[str] = None


class Callback:
    """Base class: override what you need. Exceptions raised here propagate (they are not swallowed)."""

    def on_fit_start(self, state: TrainState) -> None:
        pass

    def on_train_batch_end(self, state: TrainState, batch_idx: int) -> None:
        pass

    def on_epoch_end(self, state: TrainState, metrics: Dict[str, Any]) -> None:
        pass

    def on_fit_end(self, state: TrainState, result: Dict[str, Any]) -> None:
        pass
