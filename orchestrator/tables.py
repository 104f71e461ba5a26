"""The comparison table: one row per configuration (trials that differ only in seed), mean ± std over
seeds, the best configuration per variant marked; written as markdown and CSV."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from finetune.io_utils import finite_or_none
from finetune.models.attention import variant_hparams, variant_label

from .results import TrialRecord

COLUMNS = ("variant", "config", "seeds", "acc1", "acc5", "params_m", "gmacs", "gflops", "peak_mem_mb",
           "train_img_s", "epochs", "status", "best")
HEADERS = {
    "variant": "variant", "config": "configuration", "seeds": "seeds", "acc1": "val acc@1", "acc5": "val acc@5",
    "params_m": "params (M)", "gmacs": "GMACs", "gflops": "GFLOPs", "peak_mem_mb": "peak mem (MB)",
    "train_img_s": "train img/s", "epochs": "epochs", "status": "status", "best": "best",
}
CSV_COLUMNS = ("variant", "label", "configuration", "seeds", "n_trials", "acc1_mean", "acc1_std", "acc5_mean",
               "acc5_std", "params", "gmacs", "gflops", "peak_mem_mb", "train_img_s", "epochs", "status", "best",
               "trial_ids")
# table column -> metric averaged over seeds
SEED_MEANS = {"acc1": "val/acc1", "acc5": "val/acc5", "train_img_s": "throughput/train_img_s"}


@dataclass
class Row:
    label: str
    variant: str
    trials: List[TrialRecord]
    values: Dict[str, Any]
    best: bool = False

    def cell(self, column: str) -> str:
        return _format(column, self.values.get(column))


def _freeze(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _statistic(value: Any) -> Optional[float]:
    """A pandas statistic as a float; NaN (no values, or the std of one seed) is None."""
    return finite_or_none(float(value))


def _first(trials: Sequence[TrialRecord], key: str) -> Any:
    for t in trials:
        if t.final.get(key) is not None:
            return t.final[key]
    return None


def _status_summary(trials: Sequence[TrialRecord]) -> str:
    counts: Dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{n}x {s}" for s, n in counts.items())


def _varying_keys(records: Sequence[TrialRecord]) -> set:
    keys = {k for r in records for k in r.config} - {"seed"}
    return {k for k in keys if len({_freeze(r.config.get(k)) for r in records}) > 1}


def _config_text(config: Dict[str, Any], varying: set) -> str:
    """The variant's hyperparameters as its label spells them, then the other keys that vary."""
    variant = config.get("variant", "softmax")
    hparams = variant_hparams(variant, config)
    others = [f"{k}={config[k]}" for k in sorted(varying - set(hparams) - {"variant"}) if config.get(k) is not None]
    return ", ".join(([variant_label(variant, hparams)] if hparams else []) + others) or "-"


def _trial_frame(records: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial: its configuration key (config without seed) and the metrics averaged over seeds."""
    frame = pd.DataFrame({
        column: pd.Series([r.final.get(metric) for r in records], dtype="float64")
        for column, metric in SEED_MEANS.items()
    })
    frame["configuration"] = [_freeze([r.label, {k: v for k, v in r.config.items() if k != "seed"}])
                              for r in records]
    return frame


def _mark_best(rows: Sequence[Row]) -> None:
    by_variant: Dict[str, List[Row]] = {}
    for row in rows:
        by_variant.setdefault(row.variant, []).append(row)
    for variant_rows in by_variant.values():
        scored = [r for r in variant_rows if r.values["acc1"][0] is not None
                  and not r.values["status"].startswith(("errored", "diverged"))]
        if scored:
            best = max(scored, key=lambda r: r.values["acc1"][0])
            best.best = True
            best.values["best"] = "yes"


def build_rows(records: Sequence[TrialRecord]) -> List[Row]:
    """Group trials that differ only in seed; aggregate; mark the best configuration per variant."""
    varying = _varying_keys(records)
    rows = []
    for _, group in _trial_frame(records).groupby("configuration", sort=False):
        trials = [records[i] for i in group.index]
        stats = group[list(SEED_MEANS)].agg(["mean", "std"])
        mean_std = {c: (_statistic(stats.at["mean", c]), _statistic(stats.at["std", c])) for c in SEED_MEANS}
        cfg = trials[0].config
        params = _first(trials, "cost/params")
        epochs = sorted({t.epochs_run for t in trials})
        rows.append(Row(
            label=trials[0].label,
            variant=cfg.get("variant", "softmax"),
            trials=trials,
            values={
                "variant": trials[0].label,
                "config": _config_text(cfg, varying),
                "seeds": ",".join(str(t.config.get("seed")) for t in trials),
                "acc1": mean_std["acc1"],
                "acc5": mean_std["acc5"],
                "params_m": params / 1e6 if params is not None else None,
                "gmacs": _first(trials, "cost/gmacs"),
                "gflops": _first(trials, "cost/gflops"),
                "peak_mem_mb": _first(trials, "memory/peak_allocated_mb"),
                "train_img_s": mean_std["train_img_s"][0],
                "epochs": f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                "status": _status_summary(trials),
            },
        ))
    _mark_best(rows)
    rows.sort(key=lambda r: (r.variant, -(r.values["acc1"][0] or -1.0)))
    return rows


def _format(column: str, value: Any) -> str:
    if column in ("acc1", "acc5"):
        mean, std = value if value else (None, None)
        if mean is None:
            return "n/a"
        return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"
    if column == "peak_mem_mb":
        return "n/a (CPU)" if value is None else f"{value:.0f}"
    if value is None:
        return "" if column == "best" else "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if column in ("gmacs", "gflops", "params_m") else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row.cell(c).replace("|", "\\|") for c in COLUMNS]
        if row.best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Unformatted values, one row per configuration (None is an empty cell)."""
    table = pd.DataFrame([
        (r.variant, r.label, r.values["config"], r.values["seeds"], len(r.trials), *r.values["acc1"],
         *r.values["acc5"], _first(r.trials, "cost/params"), r.values["gmacs"], r.values["gflops"],
         r.values["peak_mem_mb"], r.values["train_img_s"], r.values["epochs"], r.values["status"], r.best,
         " ".join(t.trial_id for t in r.trials))
        for r in rows
    ], columns=list(CSV_COLUMNS), dtype=object)
    table.to_csv(path, index=False, lineterminator="\r\n")
