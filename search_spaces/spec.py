"""`SweepSpec`: one sweep as data (fixed TrainConfig values, domains, variants, seeds, how to search).

Presets (Python modules in `search_spaces.presets`) and YAML files passed with ``--config`` both end up
here through `SweepSpec.from_dict`, so they share one schema and one validator:

.. code-block:: yaml

    name: my_sweep                 # default experiment name
    fixed:                         # TrainConfig keys (see finetune.config.TrainConfig), same for every trial
      model: vit_tiny_patch16_224
      pretrained: false
      img_size: 32
      patch_size: 4
      data: "synthetic:classes=10,size=32,n=800,n_val=200"
      epochs: 3
    search:                        # shared domains (every variant): {grid|choice: [...]},
      lr: {loguniform: [1.0e-4, 3.0e-3]}   # {uniform|loguniform|randint: [low, high]}
    variants:                      # a name, or a block with the variant's own fixed values / domains;
      - softmax                    # a plug-in is named by import path, e.g. {variant: "my_pkg.mod:MyAttention"}
      - {variant: linformer, search: {rank: {grid: [16, 32]}}}
      - {variant: atrous_linear, fixed: {window: 3}, search: {dilation: {choice: [[1, 2], [1, 2, 3]]}}}
    seeds: [0, 1, 2]               # every configuration is run once per seed (grouped in the report)
    searcher: grid                 # grid | random | optuna
    scheduler: fifo                # fifo | asha
    asha: {grace_period: 1, reduction_factor: 2}
    num_samples: 1                 # grid/random: repeats of the whole space; optuna: number of trials
    metric: val/acc1
    mode: max
    resources: {cpu: 1, gpu: 0}    # per trial; gpu may be a fraction (0.5 = two trials per GPU), at most 1
                                   # workers: N (default 1): each trial is DDP on N Ray Train workers, and
                                   # cpu/gpu are per worker (docs/distributed.md)
    max_concurrent: null           # at most this many trials at once (null: as resources allow)
    max_failures: 2                # retries of a failed trial, from its last checkpoint
    num_to_keep: 2                 # checkpoints kept per trial (best by val/acc1)
    reuse_actors: null             # null (default): true for CPU-only trials (gpu: 0), false for GPU
                                   # trials; see SweepSpec.actor_reuse
    data_cache: {size: 256, dir: null}  # optional: train from a decode-once cache of fixed.data, built
                                   # once by the driver before any trial (orchestrator.data_cache); dir
                                   # null: $VITSWEEP_DATA_CACHE or ~/.cache/vitsweep/data (a cluster needs
                                   # a dir every node mounts)

`search_spaces.load_sweep` parses a preset or file once (CLI overrides merged first), validates it once
and returns a `ResolvedSweep`.

`grid` and `random` expand through Tune's own generator (``tune.grid_search`` over variant blocks, each
block's domains resolved inside it); `optuna` uses a define-by-run function (see `search_spaces.tune_space`)
so a variant's own hyperparameters exist only in trials of that variant.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from finetune.errors import AttentionConfigError, ConfigError
from finetune.models.attention import get_attention_class, variant_label

from .domains import Domain

SEARCHERS = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
MODES = ("max", "min")
TOP_LEVEL_KEYS = (
    "name", "fixed", "search", "variants", "seeds", "searcher", "scheduler", "asha", "num_samples",
    "metric", "mode", "resources", "max_concurrent", "max_failures", "num_to_keep", "reuse_actors",
    "data_cache",
)
DATA_CACHE_KEYS = ("size", "dir")
BLOCK_KEYS = ("variant", "fixed", "search", "label")
ASHA_KEYS = ("grace_period", "reduction_factor", "max_t")
RESOURCE_KEYS = ("cpu", "gpu", "workers")
MAX_WORKERS = 1024
# An experiment name is one directory under the storage root; a label names a variant in tables and
# trial directories: neither may contain a path separator or climb out with "..".
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MAX_LABEL_CHARS = 100
MAX_NUM_SAMPLES = 100_000
MAX_SEED = 2**32 - 1


def check_name(value: Any, what: str = "name") -> str:
    """An experiment name: 1-200 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ConfigError(
            f"{what}={value!r} is not allowed: an experiment name is one directory under --storage, 1-200 of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit (no '/', '\\', '..' or spaces)"
        )
    return value


def check_label(value: Any, where: str) -> str:
    """A variant label: printable text without '/', '\\' or control characters, other than '.' and '..'."""
    if (
        not isinstance(value, str) or not value.strip() or len(value) > MAX_LABEL_CHARS
        or value.strip() in (".", "..") or any(c in "/\\" or not c.isprintable() for c in value)
    ):
        raise ConfigError(f"{where}={value!r} is not allowed: a label is 1-{MAX_LABEL_CHARS} printable "
                          "characters without '/', '\\' or control characters, and not '.' or '..'")
    return value


def _finite_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _unknown(where: str, keys, allowed) -> None:
    bad = [k for k in keys if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), list(allowed), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(hints)}; allowed: {', '.join(allowed)}")


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed{hint}; allowed: {', '.join(allowed)}")


def _mapping(where: str, value: Any, what: str) -> Dict[str, Any]:
    """A copy of an optional mapping (None: empty); anything else is refused naming `where`."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of {what}, got {value!r}")
    return dict(value)


def _split(where: str, values: Optional[Mapping[str, Any]]) -> Dict[str, Domain]:
    """Parse a ``search:`` mapping; every value must be a domain."""
    values = _mapping(where, values, "config key -> domain")
    return {k: Domain.parse(k, v) for k, v in values.items()}


def _check_variant(where: str, variant: Any) -> None:
    """A built-in variant name or a plug-in's ``module:Class`` import path."""
    if not isinstance(variant, str):
        raise ConfigError(f"{where}={variant!r} must be a variant name or a 'module:Class' import path")
    try:
        get_attention_class(variant)
    except AttentionConfigError as err:
        raise AttentionConfigError(f"{where}: {err}") from None


@dataclass
class VariantBlock:
    """One attention variant with its own fixed values and domains; `label` names it in tables."""

    variant: str
    fixed: Dict[str, Any] = field(default_factory=dict)
    search: Dict[str, Domain] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def from_value(cls, value: Any, index: int) -> "VariantBlock":
        if isinstance(value, str):
            value = {"variant": value}
        if not isinstance(value, Mapping) or "variant" not in value:
            raise ConfigError(f"variants[{index}]={value!r}: give a variant name or a mapping with 'variant:'")
        _unknown(f"variants[{index}]", value, BLOCK_KEYS)
        variant = value["variant"]
        _check_variant(f"variants[{index}].variant", variant)
        fixed = _mapping(f"variants[{index}].fixed", value.get("fixed"), "TrainConfig keys")
        if "variant" in fixed or "variant" in (value.get("search") or {}):
            raise ConfigError(f"variants[{index}]: set the variant with 'variant:', not inside fixed/search")
        search = _split(f"variants[{index}].search", value.get("search"))
        # Default label: the variant's name (a plug-in's class name).
        if value.get("label") is not None:
            check_label(value["label"], f"variants[{index}].label")
        return cls(variant=variant, fixed=fixed, search=search, label=value.get("label") or variant_label(variant, {}))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "variant": self.variant,
            "label": self.label,
            "fixed": copy.deepcopy(self.fixed),
            "search": {k: d.to_spec() for k, d in self.search.items()},
        }


@dataclass
class SweepSpec:
    """A whole sweep; build with `from_dict` (checks the structure and the sweep options once); the
    values are checked by `search_spaces.load_sweep`."""

    name: str
    fixed: Dict[str, Any]
    search: Dict[str, Domain]
    variants: List[VariantBlock]
    seeds: List[int] = field(default_factory=lambda: [0])
    searcher: str = "grid"
    scheduler: str = "fifo"
    asha: Dict[str, Any] = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    num_samples: int = 1
    metric: str = "val/acc1"
    mode: str = "max"
    resources: Dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: Optional[int] = None
    max_failures: int = 0
    num_to_keep: int = 2
    reuse_actors: Optional[bool] = None
    data_cache: Optional[Dict[str, Any]] = None
    source: str = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "") -> "SweepSpec":
        """Parse the YAML/preset schema in this module's docstring; structural errors raise ConfigError."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source or 'sweep config'}: expected a mapping at the top level, got {values!r}")
        _unknown(source or "sweep config", values, TOP_LEVEL_KEYS)
        fixed = _mapping("fixed", values.get("fixed"), "TrainConfig keys")
        variants_raw = values.get("variants")
        if variants_raw is None:
            variants_raw = [fixed.pop("variant", "softmax")]
        elif "variant" in fixed:
            raise ConfigError("give the variant either in fixed: or as variants:, not both")
        if not isinstance(variants_raw, (list, tuple)) or not variants_raw:
            raise ConfigError(f"variants must be a non-empty list, got {variants_raw!r}")
        variants = [VariantBlock.from_value(v, i) for i, v in enumerate(variants_raw)]
        labels = [b.label for b in variants]
        duplicates = sorted({l for l in labels if labels.count(l) > 1})
        if duplicates:
            raise ConfigError(f"variant labels must be unique; repeated: {duplicates} (add label: to the blocks)")
        search = _split("search", values.get("search"))
        if "variant" in search:
            raise ConfigError("search over variants with the variants: list, not search.variant")
        seeds = values.get("seeds", [0])
        if isinstance(seeds, int):
            seeds = [seeds]
        if (
            not isinstance(seeds, (list, tuple)) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seeds)
        ):
            raise ConfigError(f"seeds={seeds!r} must be a non-empty list of integers in [0, {MAX_SEED}]")
        if "seed" in fixed or "seed" in search:
            raise ConfigError("set seeds with the top-level seeds: list, not fixed.seed/search.seed")
        spec = cls(name=values.get("name") or "sweep", fixed=fixed, search=search, variants=variants,
                   seeds=list(seeds), source=source)
        for key in ("searcher", "scheduler", "num_samples", "metric", "mode", "max_concurrent",
                    "max_failures", "num_to_keep", "reuse_actors"):
            if key in values:
                setattr(spec, key, values[key])
        if "asha" in values:
            asha = _mapping("asha", values["asha"], "ASHA options")
            _unknown("asha", asha, ASHA_KEYS)
            spec.asha = {**spec.asha, **asha}
        if "resources" in values:
            resources = _mapping("resources", values["resources"], "per-trial resources")
            _unknown("resources", resources, RESOURCE_KEYS)
            spec.resources = {**spec.resources, **resources}
        if values.get("data_cache") is not None:
            cache = _mapping("data_cache", values["data_cache"], "decode-once cache options")
            _unknown("data_cache", cache, DATA_CACHE_KEYS)
            spec.data_cache = {"size": 256, "dir": None, **cache}
        spec.check_options()
        return spec

    def check_options(self) -> None:
        """Checks of the sweep-level options (TrainConfig values: `search_spaces.validate`)."""
        _choice("searcher", self.searcher, SEARCHERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("mode", self.mode, MODES)
        for key in ("num_samples", "num_to_keep"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise ConfigError(f"num_samples={self.num_samples!r} must be at most {MAX_NUM_SAMPLES}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures!r} must be an integer >= 0 (or -1: retry forever)")
        if self.max_concurrent is not None and (
            isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 1
        ):
            raise ConfigError(f"max_concurrent={self.max_concurrent!r} must be a positive integer (or null)")
        if self.reuse_actors is not None and not isinstance(self.reuse_actors, bool):
            raise ConfigError(f"reuse_actors={self.reuse_actors!r} must be true, false or null (automatic)")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric={self.metric!r} must be a metric name such as 'val/acc1'")
        check_name(self.name, "name")
        for key in ("grace_period", "reduction_factor"):
            value = self.asha.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"asha.{key}={value!r} must be a positive integer")
        if self.asha["reduction_factor"] < 2:
            raise ConfigError(f"asha.reduction_factor={self.asha['reduction_factor']} must be >= 2")
        max_t = self.asha.get("max_t")
        if max_t is not None and (isinstance(max_t, bool) or not isinstance(max_t, int) or max_t < 1):
            raise ConfigError(f"asha.max_t={max_t!r} must be a positive integer (or null: the most epochs)")
        cpu, gpu = self.resources.get("cpu"), self.resources.get("gpu")
        if not _finite_number(cpu) or cpu <= 0:
            raise ConfigError(f"cpus per trial={cpu!r} (resources.cpu, --cpus-per-trial) must be a finite number > 0")
        if not _finite_number(gpu) or gpu < 0:
            raise ConfigError(f"gpus per trial={gpu!r} (resources.gpu, --gpus-per-trial) must be a finite number >= 0")
        if gpu > 1:
            n = int(gpu) if gpu == int(gpu) else 2
            raise ConfigError(
                f"gpus per trial={gpu:g}: a trial process drives one device; for data-parallel training on {n} GPUs "
                f"use --workers-per-trial {n} --gpus-per-trial 1 (resources: {{workers: {n}, gpu: 1}})"
            )
        workers = self.resources.get("workers", 1)
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"workers per trial={workers!r} (resources.workers, --workers-per-trial) must be an "
                              f"integer in 1..{MAX_WORKERS}")
        if workers > 1 and gpu not in (0, 1):
            raise ConfigError(f"gpus per worker={gpu:g} with {workers} workers per trial: give each DDP worker a "
                              "whole GPU (1) or none (0); NCCL cannot share one GPU between ranks")
        if self.data_cache is not None:
            self._check_data_cache()
        if self.searcher == "optuna":
            if len(self.seeds) > 1:
                raise ConfigError(
                    f"seeds={self.seeds}: optuna samples one configuration per trial; repeat seeds with "
                    "searcher grid or random"
                )
            grids = [d.key for d in self.domains() if d.is_grid]
            if grids and self.num_samples < 2:
                raise ConfigError(
                    f"searcher=optuna treats grid domains {grids} as categorical: set num_samples > 1"
                )

    def _check_data_cache(self) -> None:
        size, directory = self.data_cache["size"], self.data_cache["dir"]
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
            raise ConfigError(f"data_cache.size={size!r} must be an integer in [8, 4096] (256 for 224 px, 512 for 448 px)")
        if directory is not None and (not isinstance(directory, str) or not directory.strip() or "\x00" in directory):
            raise ConfigError(f"data_cache.dir={directory!r} must be a directory path (or null: the default cache root)")
        data = self.fixed.get("data")
        if not isinstance(data, str) or any("data" in b.fixed or "data" in b.search for b in self.variants) \
                or "data" in self.search:
            raise ConfigError("data_cache caches fixed.data: give the data source as one fixed value "
                              f"(fixed.data={data!r}), not per variant or searched")
        if data.strip().startswith("cache:"):
            raise ConfigError(f"data_cache with fixed.data={data!r}: the data is a cache already; drop data_cache")

    @property
    def actor_reuse(self) -> bool:
        """Whether trials share Ray worker processes (Tune's ``reuse_actors``).

        Every trial of a sweep asks for the same resources (``resources`` is per sweep), so a finished
        trial's process fits the next one. The rule:

        - ``reuse_actors: true`` / ``false``: as given.
        - ``reuse_actors: null`` (the default): true when the trials use no GPU (``resources.gpu: 0``),
          false otherwise. A CPU trial then skips the new process and its imports of torch, timm and
          torchvision (about 7 s each on a 2-core VM; BENCHMARKS.md, sweep overhead). A GPU trial keeps a
          fresh process, because only the end of the process returns all of its GPU memory (the CUDA
          context, the caching allocator, anything a variant leaked) to the next trial; set
          ``reuse_actors: true`` to trade that for the start-up time.

        A reused process runs trials one after another, never two at once; each trial still writes its
        own run outputs and checkpoints (`trainables.finetune_trainable`).
        """
        if self.reuse_actors is None:
            return not self.resources.get("gpu") and self.workers == 1
        return bool(self.reuse_actors)

    @property
    def workers(self) -> int:
        """Ray Train workers per trial (1: the trial trains in its own process, no Ray Train)."""
        return int(self.resources.get("workers", 1))

    def domains(self) -> List[Domain]:
        return list(self.search.values()) + [d for b in self.variants for d in b.search.values()]

    def to_dict(self) -> Dict[str, Any]:
        """The YAML/JSON shape (what `from_dict` reads), for the experiment marker file."""
        return {
            "name": self.name,
            "fixed": copy.deepcopy(self.fixed),
            "search": {k: d.to_spec() for k, d in self.search.items()},
            "variants": [b.to_dict() for b in self.variants],
            "seeds": list(self.seeds),
            "searcher": self.searcher,
            "scheduler": self.scheduler,
            "asha": dict(self.asha),
            "num_samples": self.num_samples,
            "metric": self.metric,
            "mode": self.mode,
            "resources": dict(self.resources),
            "max_concurrent": self.max_concurrent,
            "max_failures": self.max_failures,
            "num_to_keep": self.num_to_keep,
            "reuse_actors": self.reuse_actors,
            **({"data_cache": dict(self.data_cache)} if self.data_cache is not None else {}),
        }
