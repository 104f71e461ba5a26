"""A `SweepSpec` in Ray Tune's terms: the param space, the search algorithm and the scheduler.

Trial config layout (what `trainables.train_vit` receives)::

    {<fixed TrainConfig keys>, <shared searched keys>, "seed": ...,
     "arch": {"variant": ..., "_label": ..., <the variant's own keys>},
     "_search": {...}}          # Optuna's raw suggestions (bookkeeping, ignored by the trainable)

`grid` nests each variant's domains inside ``tune.grid_search`` over variant blocks, so a variant's own
hyperparameters are only expanded for that variant (no cross product of ranks with Performer features).
`random` samples the blocks and treats grid domains as choices. `optuna` uses `DefineByRun`, a picklable
callable (the searcher is pickled into the experiment for `vitsweep resume`).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

from trainables.layout import ARCH_KEY, DDP_KEY, LABEL_KEY, SEARCH_KEY

from .domains import Domain
from .spec import SweepSpec


def _tune_domain(domain: Domain, searcher: str):
    if searcher == "random" and domain.is_grid:
        return Domain(domain.key, "choice", domain.args).to_tune()
    return domain.to_tune()


def param_space(spec: SweepSpec) -> Dict[str, Any]:
    """Tune param space for the grid/random searchers (optuna: only the constants, see `DefineByRun`)."""
    from ray import tune

    if spec.searcher == "optuna":
        return {}
    space: Dict[str, Any] = dict(spec.fixed)
    space.update(ddp_block(spec))
    space.update({k: _tune_domain(d, spec.searcher) for k, d in spec.search.items()})
    space["seed"] = tune.grid_search(list(spec.seeds)) if len(spec.seeds) > 1 else spec.seeds[0]
    blocks = []
    for block in spec.variants:
        arch = {"variant": block.variant, LABEL_KEY: block.label, **block.fixed}
        arch.update({k: _tune_domain(d, spec.searcher) for k, d in block.search.items()})
        blocks.append(arch)
    if spec.searcher == "random" and len(blocks) > 1:
        space[ARCH_KEY] = tune.choice(blocks)
    else:
        space[ARCH_KEY] = tune.grid_search(blocks)
    return space


def ddp_block(spec: SweepSpec) -> Dict[str, Any]:
    """``{DDP_KEY: {...}}`` for a sweep whose trials run on several Ray Train workers, else nothing: what
    the trainable needs to start its `TorchTrainer` (workers, per-worker resources, retries, checkpoints
    kept). It travels in the trial config, so a resumed experiment keeps it."""
    if spec.workers <= 1:
        return {}
    return {DDP_KEY: {"workers": spec.workers, "cpu": spec.resources["cpu"], "gpu": spec.resources["gpu"],
                      "max_failures": spec.max_failures, "num_to_keep": spec.num_to_keep}}


class DefineByRun:
    """Optuna define-by-run space: pick a variant block, then only that block's hyperparameters.

    Pickles as the spec's plain-dict form (Tune saves the searcher with the experiment), and parses
    that form once after unpickling, not per trial. Optuna's parameter names live under ``_search/``;
    the returned dict is the real config.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec_dict = spec.to_dict()
        self._spec: Optional[SweepSpec] = spec

    def __getstate__(self) -> Dict[str, Any]:
        return {"spec_dict": self.spec_dict}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.spec_dict = state["spec_dict"]
        self._spec = None

    @property
    def spec(self) -> SweepSpec:
        if self._spec is None:
            self._spec = SweepSpec.from_dict(self.spec_dict)
        return self._spec

    def __call__(self, trial) -> Dict[str, Any]:
        spec = self.spec
        labels = [b.label for b in spec.variants]
        label = trial.suggest_categorical(f"{SEARCH_KEY}/{ARCH_KEY}", labels) if len(labels) > 1 else labels[0]
        block = spec.variants[labels.index(label)]
        # Copies: the parsed spec is shared by every trial.
        config: Dict[str, Any] = copy.deepcopy(spec.fixed)
        config.update(ddp_block(spec))
        config["seed"] = spec.seeds[0]
        for key, domain in spec.search.items():
            config[key] = domain.suggest(trial, f"{SEARCH_KEY}/{key}")
        arch = {"variant": block.variant, LABEL_KEY: block.label, **copy.deepcopy(block.fixed)}
        for key, domain in block.search.items():
            arch[key] = domain.suggest(trial, f"{SEARCH_KEY}/{block.label}.{key}")
        config[ARCH_KEY] = arch
        return config


def make_searcher(spec: SweepSpec):
    """None for grid/random (Tune's BasicVariantGenerator), an `OptunaSearch` for optuna."""
    if spec.searcher != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=DefineByRun(spec), metric=spec.metric, mode=spec.mode)


def make_scheduler(spec: SweepSpec, epochs: int):
    """FIFO (None) or ASHA over epochs (`training_iteration`); metric and mode come from TuneConfig."""
    if spec.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=spec.asha.get("max_t") or epochs,
        grace_period=spec.asha["grace_period"],
        reduction_factor=spec.asha["reduction_factor"],
    )
