"""`load_sweep`: a preset, a YAML file, a mapping or a `SweepSpec`, with the command line's overrides
merged in, parsed once and validated once, as the `ResolvedSweep` that the driver runs.

Checked in this order, before Ray starts: the structure and the sweep options (`SweepSpec.from_dict`);
every fixed value and both ends of every range against `TrainConfig` and the model's geometry
(`search_spaces.validate`); each trial's resources against the local instance about to be started. A
cluster's resources are known only after joining it, so the driver checks those then
(`search_spaces.validate_resources`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from finetune.config import TrainConfig
from finetune.errors import ConfigError

from .presets import preset_values, read_sweep_file
from .spec import SweepSpec
from .tune_space import make_scheduler, make_searcher, param_space
from .validate import check_trial_configs, validate_resources

SweepSource = Union[str, os.PathLike, Mapping[str, Any], SweepSpec]


@dataclass(frozen=True)
class SweepOverrides:
    """Sweep options given on the command line; None (or an empty `fixed`) keeps the source's value.

    `fixed` holds ``--set KEY=VALUE`` pairs: TrainConfig values merged over the sweep's ``fixed:``.
    """

    num_samples: Optional[int] = None
    cpus_per_trial: Optional[float] = None
    gpus_per_trial: Optional[float] = None
    workers_per_trial: Optional[int] = None
    max_concurrent: Optional[int] = None
    scheduler: Optional[str] = None
    searcher: Optional[str] = None
    max_failures: Optional[int] = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    data_cache_dir: Optional[str] = None  # --data-cache DIR ("off": train from the source as it is)

    def apply(self, values: Any) -> Any:
        """The raw sweep mapping with these overrides merged in (anything else is left to the parser)."""
        if not isinstance(values, Mapping):
            return values
        merged = dict(values)
        for key in ("num_samples", "max_concurrent", "scheduler", "searcher", "max_failures"):
            if getattr(self, key) is not None:
                merged[key] = getattr(self, key)
        resources = {k: v for k, v in (("cpu", self.cpus_per_trial), ("gpu", self.gpus_per_trial),
                                       ("workers", self.workers_per_trial)) if v is not None}
        if resources:
            merged["resources"] = _merge(values.get("resources"), resources)
        if self.fixed:
            merged["fixed"] = _merge(values.get("fixed"), self.fixed)
        if self.data_cache_dir == "off":
            merged["data_cache"] = None
        elif self.data_cache_dir is not None:
            merged["data_cache"] = _merge(values.get("data_cache") or {}, {"dir": self.data_cache_dir})
        return merged


def _merge(base: Any, changes: Mapping[str, Any]) -> Any:
    """`changes` over the mapping `base`; a `base` that is not a mapping stays, and the parser refuses it."""
    if base is None:
        return dict(changes)
    if not isinstance(base, Mapping):
        return base
    return {**base, **changes}


@dataclass(frozen=True)
class ResolvedSweep:
    """A sweep parsed and validated once: everything the driver needs to start Ray and build the Tuner.

    Args:
        spec: the parsed sweep, overrides applied.
        checked_configs: the configurations validation built, one per extreme-value combination of each
            variant block (at the first seed); not the trials themselves, which Tune expands.
        num_trials: trials the searcher makes (grid/random: the expansion times num_samples; optuna:
            num_samples).
        max_epochs: the most epochs of any configuration (ASHA's max_t unless the spec sets one).
        geometry_checked: the configurations were also checked against the model's geometry, data and
            device (`finetune.train.check_config`), not only by `TrainConfig`.
        local_resources: the (cpus, gpus) that each trial's resources were checked against; None when
            they were not (a cluster is joined and checked after joining).
    """

    spec: SweepSpec
    checked_configs: Tuple[TrainConfig, ...]
    num_trials: int
    max_epochs: int
    geometry_checked: bool
    local_resources: Optional[Tuple[float, float]] = None

    @property
    def expected_trials(self) -> Optional[int]:
        """How many trials a finished grid sweep holds (None for random/optuna: not checked)."""
        return self.num_trials if self.spec.searcher == "grid" else None

    def make_param_space(self) -> Dict[str, Any]:
        """Tune's param space (imports Ray)."""
        return param_space(self.spec)

    def make_searcher(self):
        """None (Tune's grid/random generator) or an `OptunaSearch` (imports Ray)."""
        return make_searcher(self.spec)

    def make_scheduler(self):
        """None (FIFO) or ASHA over at most `max_epochs` (imports Ray)."""
        return make_scheduler(self.spec, self.max_epochs)


def load_sweep(
    source: SweepSource,
    overrides: Optional[SweepOverrides] = None,
    *,
    local_resources: Optional[Tuple[float, float]] = None,
    check_geometry: bool = True,
    source_name: Optional[str] = None,
) -> ResolvedSweep:
    """Read, override, parse and validate a sweep, each once; every error is a `ConfigError` naming the value.

    Args:
        source: a preset name (a ``str``), a YAML file (a path, or a ``str`` ending in .yaml or .yml), a
            mapping in the schema of `search_spaces.spec`, or a `SweepSpec`.
        overrides: command-line options, merged into the source before it is parsed.
        local_resources: (cpus, gpus) of the local Ray instance about to be started: each trial's
            resources must fit. None when a cluster is joined (the driver checks it after joining).
        check_geometry: also check every configuration against the model's geometry, data and device
            (`finetune.train.check_config`); off for an experiment that was validated when it was run.
        source_name: what `SweepSpec.source` records (default ``preset:NAME``, ``config:PATH``, the
            spec's own, or "" for a mapping).
    """
    values, name = _read(source)
    if overrides is not None:
        values = overrides.apply(values)
    spec = SweepSpec.from_dict(values, source=name if source_name is None else source_name)
    configs = check_trial_configs(spec, check_geometry=check_geometry)
    if local_resources is not None:
        validate_resources(spec, *local_resources)
    return ResolvedSweep(
        spec=spec,
        checked_configs=tuple(configs),
        num_trials=count_trials(spec),
        max_epochs=max(cfg.epochs for cfg in configs),
        geometry_checked=check_geometry,
        local_resources=local_resources,
    )


def _read(source: SweepSource) -> Tuple[Any, str]:
    """The raw sweep mapping of `source` and its name for `SweepSpec.source`."""
    if isinstance(source, SweepSpec):
        return source.to_dict(), source.source
    if isinstance(source, Mapping):
        return source, ""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        return read_sweep_file(path), f"config:{path.resolve()}"
    if isinstance(source, str):
        return preset_values(source), f"preset:{source}"
    raise ConfigError(f"sweep source {source!r}: give a preset name, a YAML path, a mapping or a SweepSpec")


def count_trials(spec: SweepSpec) -> int:
    """How many trials the searcher makes."""
    if spec.searcher == "optuna":
        return spec.num_samples
    if spec.searcher == "random":  # grid domains are sampled as choices
        return len(spec.seeds) * spec.num_samples
    shared = math.prod(len(d.args) for d in spec.search.values() if d.is_grid)
    per_block = sum(math.prod(len(d.args) for d in b.search.values() if d.is_grid) for b in spec.variants)
    return shared * per_block * len(spec.seeds) * spec.num_samples
