"""Validate a whole sweep before Ray starts: every fixed value, both ends of every range, every listed
value, against TrainConfig and against the model's geometry (`finetune.train.check_config`), plus the
per-trial resources against what the cluster offers. `search_spaces.load_sweep` calls these once.

Nothing here imports Ray: a bad sweep fails in the driver in well under a second, naming the value.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, List

from finetune.config import TrainConfig
from finetune.errors import ConfigError, MetricError, VitsweepError

from .domains import Domain
from .spec import SweepSpec, VariantBlock

# Above this many extreme-value combinations per variant, each domain is checked on its own.
MAX_COMBINATIONS = 64
# Keys that TrainConfig.validate checks completely and that play no part in model geometry, data or
# device: configurations that differ only in these share one (slower) `check_config` call.
OPTIMISATION_KEYS = (
    "lr", "min_lr", "weight_decay", "warmup_epochs", "layer_decay", "label_smoothing", "mixup", "cutmix",
    "clip_grad", "seed", "epochs", "batch_size", "drop_path", "log_interval",
)


def _combinations(domains: List[Domain]) -> Iterator[Dict[str, Any]]:
    """Every combination of extreme values, or one domain at a time when that would be too many."""
    sizes = [len(d.extremes()) for d in domains]
    total = 1
    for s in sizes:
        total *= s
    if total <= MAX_COMBINATIONS:
        for values in itertools.product(*(d.extremes() for d in domains)):
            yield {d.key: v for d, v in zip(domains, values)}
        return
    base = {d.key: d.extremes()[0] for d in domains}
    for d in domains:
        for v in d.extremes():
            yield {**base, d.key: v}


def _describe(combo: Dict[str, Any], block: VariantBlock) -> str:
    if not combo:
        return f"variant {block.label!r}"
    shown = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in combo.items())
    return f"variant {block.label!r} with {shown}"


def trial_configs(spec: SweepSpec) -> Iterator[tuple]:
    """(block, combo, flat TrainConfig dict) for every extreme-value combination of every block."""
    for block in spec.variants:
        domains = list(spec.search.values()) + list(block.search.values())
        for combo in _combinations(domains):
            flat = {**spec.fixed, **block.fixed, "variant": block.variant, "seed": spec.seeds[0], **combo}
            yield block, combo, flat


# What every trial reports each epoch (`finetune.loop`), besides val/acc{k} per topk and, with
# eval_at_start, swap/loss and swap/acc{k}; and Tune's own per-report counters.
ALWAYS_REPORTED = (
    "epoch", "train/loss", "val/loss", "lr", "throughput/train_img_s", "throughput/eval_img_s", "time/epoch_s",
    "throughput/compute_img_s", "time/data_wait_frac",
    "cost/params", "cost/trainable_params", "cost/gmacs", "cost/gflops", "training_iteration", "time_total_s", "time_this_iter_s",
)


def reported_metrics(cfg: TrainConfig) -> List[str]:
    """The numeric metrics a trial with `cfg` reports every epoch: what a sweep's ``metric`` may name."""
    names = list(ALWAYS_REPORTED) + [f"val/acc{k}" for k in cfg.topk]
    if cfg.eval_at_start:
        names += ["swap/loss"] + [f"swap/acc{k}" for k in cfg.topk]
    if cfg.device != "cpu":  # measured on CUDA only (None on CPU)
        names += ["memory/peak_allocated_mb", "memory/peak_reserved_mb", "memory/peak_nvml_mb", "throughput/mfu"]
    return names


def _check_metric(spec: SweepSpec, block: VariantBlock, cfg: TrainConfig) -> None:
    names = reported_metrics(cfg)
    if spec.metric not in names:
        raise ConfigError(
            f"metric={spec.metric!r} is not reported by the trials of variant {block.label!r} (topk={list(cfg.topk)}, "
            f"eval_at_start={cfg.eval_at_start}); reported: {', '.join(names)}"
        )


def check_trial_configs(spec: SweepSpec, check_geometry: bool = True) -> List[TrainConfig]:
    """Raise ConfigError (naming the variant, the key and the value) for the first bad value.

    Returns the checked TrainConfigs (one per extreme-value combination per variant). Without
    `check_geometry` only `TrainConfig` checks run (no model probe, data or device checks). The sweep
    options were checked when `spec` was parsed.
    """
    # Loads torch and timm: only when a sweep is validated.
    from finetune.train import check_config

    checked: List[TrainConfig] = []
    geometry_checked = set()
    for block, combo, flat in trial_configs(spec):
        try:
            cfg = TrainConfig.from_dict(flat)
            _check_metric(spec, block, cfg)
            if cfg.batch_size % spec.workers:
                raise ConfigError(f"batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                                  f"{spec.workers} workers per trial; allowed: a multiple of {spec.workers}")
            key = repr(sorted((k, v) for k, v in cfg.to_dict().items() if k not in OPTIMISATION_KEYS))
            if check_geometry and key not in geometry_checked:
                check_config(cfg)
                _check_topk(cfg)
                geometry_checked.add(key)
        except VitsweepError as err:
            raise ConfigError(f"{_describe(combo, block)}: {err}") from None
        checked.append(cfg)
    epochs = {c.epochs for c in checked}
    max_t = spec.asha.get("max_t")
    if spec.scheduler == "asha" and max_t is not None and max_t > max(epochs):
        raise ConfigError(f"asha.max_t={max_t} exceeds epochs={max(epochs)}: trials stop before reaching it")
    return checked


def _check_topk(cfg: TrainConfig) -> None:
    """topk against the class count where the data spec fixes it without loading (synthetic, ImageNet-100);
    `check_config` leaves this to `run_training`, which would fail every trial of the sweep."""
    from finetune.data.spec import parse_data_spec
    from finetune.metrics import check_topk

    ds = parse_data_spec(cfg.data)
    classes = ds.options.get("classes") if ds.kind == "synthetic" else (100 if ds.kind == "imagenet100" else None)
    if classes is not None:
        try:
            check_topk(cfg.topk, int(classes))
        except MetricError as err:
            raise ConfigError(f"{err} (data={cfg.data!r})") from None


def validate_resources(spec: SweepSpec, available_cpus: float, available_gpus: float) -> None:
    """Per-trial resources must fit the cluster (or the local instance about to be started). With
    ``resources.workers`` N > 1, cpu and gpu are per worker: the trial needs N times them."""
    cpu, gpu = spec.resources["cpu"], spec.resources["gpu"]
    workers = spec.workers
    if workers > 1 and (workers * cpu > available_cpus or workers * gpu > available_gpus):
        raise ConfigError(
            f"{workers} workers per trial x (cpu {cpu:g}, gpu {gpu:g}) per worker = {workers * cpu:g} CPU(s), "
            f"{workers * gpu:g} GPU(s), but the cluster has {available_cpus:g} CPU(s), {available_gpus:g} GPU(s); "
            "lower --workers-per-trial or the per-worker --cpus-per-trial/--gpus-per-trial"
        )
    if gpu > available_gpus:
        raise ConfigError(
            f"gpus per trial={gpu} but the cluster has {available_gpus:g} GPU(s); lower --gpus-per-trial, "
            "declare GPUs with --num-gpus, or join a cluster that has them with --address"
        )
    if cpu > available_cpus:
        raise ConfigError(
            f"cpus per trial={cpu} but the cluster has {available_cpus:g} CPU(s); lower --cpus-per-trial"
        )
