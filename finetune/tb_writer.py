"""TensorBoard helpers: scalars under the metric names `finetune.loop.fit` reports (``train/loss``,
``val/acc1``, ...), hparams, and a sample-image grid. Non-finite and missing values are not logged."""

from __future__ import annotations

from numbers import Real
from typing import Any, Mapping

from torch.utils.tensorboard import SummaryWriter

from .io_utils import finite_or_none


def _finite_number(value: Any) -> bool:
    return isinstance(finite_or_none(value), Real) and not isinstance(value, bool)


def _hparam_value(value: Any):
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class TBWriter:
    """A thin wrapper over `SummaryWriter` with vitsweep's conventions."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every finite numeric metric, under its own name (e.g. ``val/acc1``)."""
        for name, value in metrics.items():
            if _finite_number(value) and name != "epoch":
                self.writer.add_scalar(name, float(value), global_step=step)
        self.writer.flush()

    def figure(self, tag: str, figure, step: int = 0) -> None:
        self.writer.add_figure(tag, figure, global_step=step, close=True)
        self.writer.flush()

    def hparams(self, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Config and final metrics in the HPARAMS tab (written into this run's directory)."""
        hp = {k: _hparam_value(v) for k, v in config.items() if v is not None}
        final = {f"hparam/{k}": float(v) for k, v in metrics.items() if _finite_number(v)}
        self.writer.add_hparams(hp, final, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TBWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
