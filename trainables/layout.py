"""The trial config layout `train_vit` accepts, shared with `search_spaces.tune_space` which builds it::

    {<TrainConfig keys>, "arch": {"variant": ..., "_label": ..., <the variant's own keys>},
     "_search": {...}}

``arch`` is one variant block chosen by the searcher (its keys override the top level); ``_label``
names the block in reports; ``_search`` holds Optuna's raw suggestions and is ignored here.
Nothing here imports Ray, so reports read trial directories without it.
"""

from __future__ import annotations

from typing import Any, Dict

ARCH_KEY = "arch"
LABEL_KEY = "_label"
SEARCH_KEY = "_search"
# Present when a trial runs data-parallel on Ray Train workers: {"workers", "cpu", "gpu", "max_failures",
# "num_to_keep"} (search_spaces.tune_space.ddp_block; trainables.distributed reads it).
DDP_KEY = "_ddp"
# A trial's own run outputs (result.json, weights, tb/) go to <trial dir>/run/: Tune writes its own
# result.json in the trial directory.
RUN_SUBDIR = "run"


def flatten_trial_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A trial config as flat TrainConfig keys: ``arch`` merged in, bookkeeping dropped."""
    flat = {k: v for k, v in config.items() if k not in (ARCH_KEY, SEARCH_KEY, DDP_KEY)}
    for key, value in (config.get(ARCH_KEY) or {}).items():
        if key != LABEL_KEY:
            flat[key] = value
    return flat


def trial_label(config: Dict[str, Any]) -> str:
    """The variant block's label (falls back to the variant name)."""
    arch = config.get(ARCH_KEY) or {}
    return arch.get(LABEL_KEY) or arch.get("variant") or config.get("variant", "softmax")
