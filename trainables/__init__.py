"""Ray Tune trainables: `train_vit` runs one `finetune` configuration and reports every epoch.

`trainables.layout` (the trial config layout) imports neither Ray nor torch; the trainable itself is
loaded on first use, so `search_spaces` can share the layout without loading Ray.
"""

from .layout import ARCH_KEY, LABEL_KEY, RUN_SUBDIR, SEARCH_KEY, flatten_trial_config, trial_label

__all__ = ["ARCH_KEY", "LABEL_KEY", "RUN_SUBDIR", "SEARCH_KEY", "TuneReportCallback", "flatten_trial_config",
           "reportable", "train_vit", "trial_label"]


def __getattr__(name: str):
    if name in ("train_vit", "TuneReportCallback", "reportable"):
        from . import finetune_trainable

        return getattr(finetune_trainable, name)
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")
