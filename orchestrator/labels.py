"""Short names of trials, as the console, TensorBoard, the trackers and `vitsweep.load_results` show them.

A trial is named by its variant block's label, the variant's hyperparameters (by their `HParam.short`
names), the shared keys the searcher varied, and the seed: ``atrous_linear dil=1,2,3 w=3 m=64 seed0``,
``linformer k=64 lr=0.0005 seed1``. `safe_name` spells one for a directory. Nothing here imports Ray.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from finetune.models.attention import variant_hparams, variant_label
from trainables.layout import ARCH_KEY, SEARCH_KEY, flatten_trial_config, trial_label

_UNSAFE = re.compile(r"[^A-Za-z0-9.,=+_-]+")
# Keys never shown as searched: the variant block (shown by its label) and the seed (always shown).
_NOT_SHOWN = {ARCH_KEY, "seed", SEARCH_KEY}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_value(v) for v in value)
    return str(value)


def config_label(config: Mapping[str, Any], searched: Iterable[str] = ()) -> str:
    """The block label and its hyperparameters, then ``key=value`` of each `searched` shared key."""
    flat = flatten_trial_config(dict(config))
    variant = flat.get("variant", "softmax")
    block = trial_label(dict(config))
    base, full = variant_label(variant, {}), variant_label(variant, variant_hparams(variant, flat))
    parts = [block]
    suffix = full[len(base):].strip()
    if suffix and not block.endswith(suffix):
        parts.append(suffix)
    parts += [f"{k}={_value(flat[k])}" for k in searched if k in flat and k not in _NOT_SHOWN]
    return " ".join(parts)


def run_label(config: Mapping[str, Any], searched: Iterable[str] = ()) -> str:
    """`config_label` and the seed: ``atrous_linear dil=1,2,3 w=3 m=64 seed0``."""
    seed = flatten_trial_config(dict(config)).get("seed")
    label = config_label(config, searched)
    return label if seed is None else f"{label} seed{seed}"


def searched_keys(evaluated_params: Mapping[str, Any]) -> list:
    """The shared top-level keys a Tune searcher chose (`Trial.evaluated_params`): grid/random name
    them as they are, Optuna under ``_search/``; the variant block and its keys are left out."""
    keys = []
    for key in evaluated_params:
        name = key[len(SEARCH_KEY) + 1:] if key.startswith(SEARCH_KEY + "/") else key
        if "/" not in name and "." not in name and name not in _NOT_SHOWN and name not in keys:
            keys.append(name)
    return keys


def trial_run_label(trial) -> str:
    """`run_label` of a Tune `Trial`, with the shared keys its searcher varied."""
    return run_label(trial.config, searched_keys(getattr(trial, "evaluated_params", None) or {}))


def safe_name(label: str) -> str:
    """`label` for a directory name: runs of characters other than letters, digits and ``.,=+_-``
    (spaces, ``/``, a plug-in's ``module:Class``) become one ``_``."""
    return _UNSAFE.sub("_", label).strip("_") or "trial"

