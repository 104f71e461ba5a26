"""The user-facing error types: each names the bad value and what is allowed. The CLI turns these
into a one-line message and exit code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations


def user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .metrics import MetricError
    from .models import WeightsError
    from .models.attention import AttentionConfigError

    return (ConfigError, AttentionConfigError, DataError, WeightsError, MetricError, CheckpointError)
