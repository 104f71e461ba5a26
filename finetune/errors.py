"""Every error a user can cause, under one base class.

`VitsweepError` is what the CLI catches: it prints the message and exits 2, no traceback. Each
subclass names the bad value and what is allowed. Anything that is not a `VitsweepError` is a bug and
keeps its traceback. This module imports nothing from the project, so every layer can raise these.

The value errors also subclass `ValueError`, so code that caught them as such keeps working.
"""

from __future__ import annotations


class VitsweepError(Exception):
    """Base of every user-facing error: the message is meant for the user, as it is."""


class ConfigError(VitsweepError, ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


class AttentionConfigError(ConfigError):
    """A variant hyperparameter is out of range; the message names the value and what is allowed."""


class DataError(VitsweepError, ValueError):
    """A data spec, data set or image that cannot be used; the message says which and why."""


class WeightsError(VitsweepError, ValueError):
    """A weights file is missing, unreadable, unsafe or does not fit the architecture."""


class MetricError(VitsweepError, ValueError):
    """A metric request that the data or model cannot satisfy (e.g. top-k above the class count)."""


class CheckpointError(VitsweepError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or does not match the run."""


class ReportError(VitsweepError, ValueError):
    """An experiment directory that cannot be reported on."""


class TrainingOOMError(VitsweepError, RuntimeError):
    """The device ran out of memory; raised after the failed step's memory has been released."""

