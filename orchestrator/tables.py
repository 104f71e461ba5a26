"""The comparison table: one row per configuration (trials that differ only in seed), mean ± std over
seeds, the best configuration per variant marked; written as markdown and CSV.

Statistics over seeds: acc@1 has a 95 % confidence interval from the t-distribution with n - 1
degrees of freedom (scipy's quantile when scipy is installed, else a t-table for n - 1 <= 30 and the
normal value 1.96 beyond), and each configuration is compared with the best softmax configuration by
Welch's t-test at the 5 % level ("≈": the difference is within seed noise). The markdown table ends
with that legend and a line saying whether the training budgets (epochs, batch size, data, the lr
grid) were equal across variants. When trials report ``swap/acc1`` (``eval_at_start``), the accuracy
at the swap is shown beside the final one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from finetune.io_utils import finite_or_none
from finetune.models.attention import variant_hparams, variant_label
from finetune.timing import COMPUTE_IMG_S, DATA_BOUND_THRESHOLD, DATA_WAIT, is_data_bound

from .results import TrialRecord

COLUMNS = ("variant", "config", "seeds", "acc1", "acc1_ci", "vs_softmax", "swap_acc1", "acc5", "params_m", "gmacs",
           "gflops", "peak_mem_mb", "train_img_s", "compute_img_s", "data_wait", "epochs", "status", "best")
HEADERS = {
    "variant": "variant", "config": "configuration", "seeds": "seeds", "acc1": "val acc@1",
    "acc1_ci": "acc@1 95% CI", "vs_softmax": "vs softmax", "swap_acc1": "acc@1 at swap", "acc5": "val acc@5",
    "params_m": "params (M)", "gmacs": "GMACs", "gflops": "GFLOPs", "peak_mem_mb": "peak mem (MB)",
    "train_img_s": "train img/s", "compute_img_s": "step img/s", "data_wait": "data wait", "epochs": "epochs",
    "status": "status", "best": "best",
}
CSV_COLUMNS = ("variant", "label", "configuration", "seeds", "n_trials", "acc1_mean", "acc1_std", "acc5_mean",
               "acc5_std", "params", "gmacs", "gflops", "peak_mem_mb", "train_img_s", "epochs", "status", "best",
               "trial_ids", "acc1_ci_low", "acc1_ci_high", "vs_softmax", "swap_acc1_mean", "swap_acc1_std",
               "compute_img_s", "data_wait_frac", "data_bound", "shared_gpu")
# table column -> metric averaged over seeds
SEED_MEANS = {"acc1": "val/acc1", "acc5": "val/acc5", "train_img_s": "throughput/train_img_s",
              "swap_acc1": "swap/acc1", "compute_img_s": COMPUTE_IMG_S, "data_wait": DATA_WAIT}
# Marks on img/s and memory cells (legend: `speed_notes`): † the trials shared a GPU, ‡ data-bound.
SHARED_MARK, DATA_BOUND_MARK = "†", "‡"
# Two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# Config keys that make up a trial's training budget (beside the lr grid).
BUDGET_KEYS = ("epochs", "batch_size", "data", "max_train_batches", "img_size")
LEGEND = (
    "acc@1 95% CI: mean ± t(0.975, n-1) · std / sqrt(n) over the n seeds (t from scipy, or a t-table for n-1 <= 30 "
    "and 1.96 beyond); n/a with one seed. vs softmax: Welch's t-test of this row's seeds against the best softmax "
    "configuration at the 5 % level: ≈ means the difference is within seed noise, + / − a significant gain / loss "
    "(|t| above the t quantile for the Welch-Satterthwaite degrees of freedom); n/a with fewer than two seeds on "
    "either side."
)

# The inference profile (finetune.inference_profile): table column -> metric. Latency and img/s are
# means over seeds; the batch of img/s, the memory figures and their source come from the first trial.
INFER_COLUMNS = {"infer_latency_ms": "infer/latency_b1_ms", "infer_img_s": "infer/img_s",
                 **{f"infer_mem_b{b}": f"infer/peak_mem_b{b}_mb" for b in (1, 32, 64, 128)},
                 "infer_mem_source": "infer/mem_source"}
INFER_HEADERS = {"infer_latency_ms": "infer latency b1 (ms)", "infer_img_s": "infer img/s (batch)",
                 **{f"infer_mem_b{b}": f"infer peak mem b{b} (MB)" for b in (1, 32, 64, 128)},
                 "infer_mem_source": "infer mem"}
HEADERS.update(INFER_HEADERS)
# comparison.csv: the unformatted inference columns (appended after CSV_COLUMNS)
INFER_CSV = {"infer_latency_b1_ms": "infer/latency_b1_ms", "infer_img_s": "infer/img_s",
             "infer_img_s_batch": "infer/img_s_batch",
             **{f"infer_peak_mem_b{b}_mb": f"infer/peak_mem_b{b}_mb" for b in (1, 32, 64, 128)},
             "infer_mem_source": "infer/mem_source"}
INFER_LEGEND = (
    "infer: the inference profile, measured once per trial after its last epoch on the trial's device (eval mode, "
    "inference_mode, the trial's precision): latency = median of timed batch-1 forwards; img/s at the batch in "
    "parentheses (CUDA: the largest power of two that fits; CPU: a fixed 32); peak mem at batch 1/32/64/128 = "
    "weights + activations, measured on CUDA (infer mem: cuda) or from the analytic model on CPU (infer mem: "
    "analytic); n/a: the trial did not finish (stopped early, diverged, errored) or did not fit."
)


def _seed_mean(trials: Sequence[TrialRecord], key: str) -> Optional[float]:
    values = [float(t.final[key]) for t in trials if isinstance(t.final.get(key), (int, float))
              and not isinstance(t.final.get(key), bool)]
    return sum(values) / len(values) if values else None


def infer_values(trials: Sequence[TrialRecord]) -> Dict[str, Any]:
    """A configuration's inference columns (`INFER_COLUMNS`) and the batch of its img/s."""
    values: Dict[str, Any] = {c: _first(trials, m) for c, m in INFER_COLUMNS.items()}
    values["infer_latency_ms"] = _seed_mean(trials, "infer/latency_b1_ms")
    values["infer_img_s"] = _seed_mean(trials, "infer/img_s")
    values["infer_img_s_batch"] = _first(trials, "infer/img_s_batch")
    return values


def _format_infer(column: str, value: Any, row_values: Dict[str, Any]) -> str:
    if value is None:
        return "n/a"
    if column == "infer_mem_source":
        return str(value)
    if column == "infer_img_s":
        batch = row_values.get("infer_img_s_batch")
        return f"{value:.1f}" + (f" (b{batch})" if batch is not None else "")
    return f"{value:.2f}" if column == "infer_latency_ms" else f"{value:.1f}"


def _with_infer_columns(columns: List[str], rows: Sequence["Row"]) -> List[str]:
    """The inference columns before "epochs", when any row has an inference profile."""
    if not any(r.values.get("infer_mem_source") is not None or r.values.get("infer_latency_ms") is not None
               for r in rows):
        return columns
    at = columns.index("epochs") if "epochs" in columns else len(columns)
    return columns[:at] + list(INFER_COLUMNS) + columns[at:]


def t_quantile(dof: float) -> float:
    """The 97.5 % quantile of Student's t with `dof` degrees of freedom (fractional: Welch)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        whole = int(math.floor(dof))  # fewer degrees of freedom: the larger (conservative) quantile
        return T_975[whole - 1] if 1 <= whole <= len(T_975) else 1.96
    return float(student_t.ppf(0.975, dof))


def confidence_interval(values: Sequence[float]) -> Optional[tuple]:
    """(low, high) of the 95 % t-interval of the mean; None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def welch_compare(a: Sequence[float], b: Sequence[float]) -> Optional[str]:
    """'+' / '−' when mean(a) is significantly above / below mean(b) (Welch, 5 %), '≈' when not; None
    with fewer than two values on either side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return "≈" if ma == mb else ("+" if ma > mb else "−")
    t = (ma - mb) / math.sqrt(va + vb)
    dof = (va + vb) ** 2 / ((va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0))
    if abs(t) <= t_quantile(dof):
        return "≈"
    return "+" if t > 0 else "−"


@dataclass
class Row:
    label: str
    variant: str
    trials: List[TrialRecord]
    values: Dict[str, Any]
    best: bool = False

    def cell(self, column: str) -> str:
        if column in INFER_COLUMNS:
            return _format_infer(column, self.values.get(column), self.values)
        text = _format(column, self.values.get(column))
        if column in ("train_img_s", "compute_img_s", "peak_mem_mb") and self.values.get("shared_gpu"):
            text += SHARED_MARK
        if column in ("train_img_s", "data_wait") and self.values.get("data_bound"):
            text += DATA_BOUND_MARK
        return text


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
                  and not r.values["status"].startswith(("errored", "diverged"))
                  and all(t.status != "unfinished" for t in r.trials)]  # an interrupted trial is never best
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
                "swap_acc1": mean_std["swap_acc1"],
                "params_m": params / 1e6 if params is not None else None,
                "gmacs": _first(trials, "cost/gmacs"),
                "gflops": _first(trials, "cost/gflops"),
                "peak_mem_mb": _first(trials, "memory/peak_allocated_mb"),
                "train_img_s": mean_std["train_img_s"][0],
                "compute_img_s": mean_std["compute_img_s"][0],
                "data_wait": mean_std["data_wait"][0],
                "data_bound": any(is_data_bound(t.final) for t in trials),
                "shared_gpu": max((t.gpus_per_trial for t in trials if t.shared_gpu), default=None),
                "epochs": f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                "status": _status_summary(trials),
                **infer_values(trials),
            },
        ))
    _mark_best(rows)
    _compare_with_softmax(rows)
    rows.sort(key=lambda r: (r.variant, -(r.values["acc1"][0] or -1.0)))
    return rows


def _seed_values(row: Row, metric: str = "val/acc1") -> List[float]:
    return [float(t.final[metric]) for t in row.trials if t.final.get(metric) is not None]


def _compare_with_softmax(rows: Sequence[Row]) -> None:
    """acc@1's confidence interval per row, and Welch's test against the best softmax row."""
    reference = next((r for r in rows if r.variant == "softmax" and r.best), None)
    for row in rows:
        row.values["acc1_ci"] = confidence_interval(_seed_values(row))
        if reference is None:
            row.values["vs_softmax"] = None
        elif row is reference:
            row.values["vs_softmax"] = "reference"
        else:
            row.values["vs_softmax"] = welch_compare(_seed_values(row), _seed_values(reference))


def budget_line(rows: Sequence[Row]) -> str:
    """Whether every variant trained with the same budget: BUDGET_KEYS and the lr grid, per variant."""
    per_variant: Dict[str, Dict[str, set]] = {}
    for row in rows:
        for t in row.trials:
            keys = per_variant.setdefault(row.variant, {})
            for key in (*BUDGET_KEYS, "lr"):
                keys.setdefault(key, set()).add(_freeze(t.config.get(key)))
    differing = []
    for key in (*BUDGET_KEYS, "lr"):
        grids = {v: tuple(sorted(keys.get(key, set()))) for v, keys in per_variant.items()}
        if len(set(grids.values())) > 1:
            name = "lr grid" if key == "lr" else key
            shown = "; ".join(f"{v}: {', '.join(g)}" for v, g in grids.items())
            differing.append(f"{name} ({shown})")
    if len(per_variant) < 2:
        return "Budgets: one variant only; nothing to compare."
    if differing:
        return "Budgets were NOT equal across variants: " + "; ".join(differing) + "."
    first = next(iter(per_variant.values()))
    same = ", ".join(f"{'lr grid' if k == 'lr' else k}={'/'.join(sorted(first[k]))}" for k in (*BUDGET_KEYS, "lr")
                     if first.get(k) and first[k] != {"null"})
    return f"Budgets were equal across variants ({same})."


def _format(column: str, value: Any) -> str:
    if column == "acc1_ci":
        return "n/a" if value is None else f"[{value[0]:.3f}, {value[1]:.3f}]"
    if column == "vs_softmax":
        return "n/a" if value is None else ("—" if value == "reference" else value)
    if column in ("acc1", "acc5", "swap_acc1"):
        mean, std = value if value else (None, None)
        if mean is None:
            return "n/a"
        return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"
    if column == "peak_mem_mb":
        return "n/a (CPU)" if value is None else f"{value:.0f}"
    if column == "data_wait":
        return "n/a" if value is None else f"{100 * value:.0f}%"
    if value is None:
        return "" if column == "best" else "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if column in ("gmacs", "gflops", "params_m") else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """The table, then its statistics legend and the budget line. "acc@1 at swap" appears when any
    trial reports ``swap/acc1``."""
    with_swap = any(r.values.get("swap_acc1", (None, None))[0] is not None for r in rows)
    columns = [c for c in COLUMNS if c != "swap_acc1" or with_swap]
    columns = _with_infer_columns(columns, rows)
    lines = ["| " + " | ".join(HEADERS[c] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.cell(c).replace("|", "\\|") for c in columns]
        if row.best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    legend = LEGEND + (" acc@1 at swap: the model evaluated before its first training step (eval_at_start), "
                       "mean ± std over seeds." if with_swap else "")
    legend += (" " + INFER_LEGEND) if INFER_COLUMNS.keys() & set(columns) else ""
    lines += ["", legend, "", *speed_notes(rows), budget_line(rows)]
    return "\n".join(lines)


def speed_notes(rows: Sequence[Row]) -> List[str]:
    """What the speed columns mean, and the marks that make them not comparable (each note then a blank
    line): step img/s and data wait (`finetune.timing`); ‡ data-bound; † a shared GPU."""
    notes = ["train img/s: end to end; step img/s: the model step alone; data wait: the share of the training "
             "time spent waiting for the next batch (mean over seeds)."]
    bound = [row_name(r) for r in rows if r.values.get("data_bound")]
    if bound:
        notes.append(f"{DATA_BOUND_MARK} data-bound (data wait >= {100 * DATA_BOUND_THRESHOLD:.0f}%): its train img/s "
                     f"measures the input pipeline, not the model ({', '.join(bound)}); train from the decode-once "
                     "cache (`vitsweep data cache`) or give the loader more workers.")
    shared = sorted({r.values["shared_gpu"] for r in rows if r.values.get("shared_gpu")})
    if shared:
        notes.append(f"{SHARED_MARK} trials shared a GPU ({'/'.join(f'{g:g}' for g in shared)} GPU per trial): their "
                     "img/s and memory depend on what ran beside them and are not comparable across configurations "
                     "(measure with --gpus-per-trial 1).")
    return [line for note in notes for line in (note, "")]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Unformatted values, one row per configuration (None is an empty cell)."""
    table = pd.DataFrame([
        (r.variant, r.label, r.values["config"], r.values["seeds"], len(r.trials), *r.values["acc1"],
         *r.values["acc5"], _first(r.trials, "cost/params"), r.values["gmacs"], r.values["gflops"],
         r.values["peak_mem_mb"], r.values["train_img_s"], r.values["epochs"], r.values["status"], r.best,
         " ".join(t.trial_id for t in r.trials), *(r.values.get("acc1_ci") or (None, None)), r.values.get("vs_softmax"),
         *r.values.get("swap_acc1", (None, None)), r.values.get("compute_img_s"), r.values.get("data_wait"),
         r.values.get("data_bound"), r.values.get("shared_gpu"))
        for r in rows
    ], columns=list(CSV_COLUMNS), dtype=object)
    for column, metric in INFER_CSV.items():
        table[column] = pd.Series([_infer_csv_value(r, metric) for r in rows], dtype=object)
    table.to_csv(path, index=False, lineterminator="\r\n")


def _infer_csv_value(row: Row, metric: str) -> Any:
    if metric in ("infer/latency_b1_ms", "infer/img_s"):
        return _seed_mean(row.trials, metric)
    return _first(row.trials, metric)


def pareto_front(points: Sequence[tuple]) -> List[int]:
    """Indices of the (cost, accuracy) points no other point dominates (lower cost and higher accuracy
    is better), ordered by cost."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def row_name(row: Row, sep: str = " ") -> str:
    """A configuration's short name: its variant label with the hyperparameters and keys that vary."""
    config = row.values["config"]
    if config == "-":
        return row.label
    if config.startswith(f"{row.label} "):  # the variant's label already names the row
        return config
    return f"{row.label}{sep}{config}"


def _ranked(row: Row) -> bool:
    """Whether a row may be marked best or on the Pareto front: as `_mark_best`, never an errored,
    diverged or interrupted (unfinished) trial."""
    return (row.values["acc1"][0] is not None and not row.values["status"].startswith(("errored", "diverged"))
            and all(t.status != "unfinished" for t in row.trials))


def console_table(rows: Sequence[Row], width: int = 100) -> str:
    """The comparison for a terminal, at most `width` columns: configurations sorted by val acc@1 (best
    first), the overall best marked ``*`` and the Pareto front of acc@1 vs GFLOPs marked ``P``. The
    full table (CI, Welch's test, acc@5, params, GMACs, memory) is in comparison.md/.csv."""
    ordered = sorted(rows, key=lambda r: (not _ranked(r), -(r.values["acc1"][0] or 0.0)))
    ranked = [r for r in ordered if _ranked(r)]
    best = ranked[0] if ranked else None
    costed = [r for r in ranked if r.values["gflops"] is not None]
    pareto = {id(costed[i]) for i in pareto_front([(r.values["gflops"], r.values["acc1"][0]) for r in costed])}
    fixed = 3 + 15 + 8 + 8 + 14 + 5 + 6  # '#', acc@1, GFLOPs, img/s, status, mark, separators
    name_width = max(16, width - fixed)

    def clip(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    lines = [f"{'#':>2} {'configuration':<{name_width}} {'val acc@1':>15} {'GFLOPs':>7} {'img/s':>7} "
             f"{'status':<14} {'':>3}".rstrip()]
    for i, row in enumerate(ordered, 1):
        mark = (("*" if row is best else " ") + ("P" if id(row) in pareto else " ")
                + ("D" if row.values.get("data_bound") else "") + ("S" if row.values.get("shared_gpu") else ""))
        seeds = f" (seeds {row.values['seeds']})" if len(row.trials) > 1 else ""
        lines.append(
            f"{i:>2} {clip(row_name(row) + seeds, name_width):<{name_width}} {row.cell('acc1'):>15} "
            f"{_format('gflops', row.values['gflops']):>7} {_format('train_img_s', row.values['train_img_s']):>7} "
            f"{clip(row.values['status'], 14):<14} {mark}".rstrip()
        )
    lines.append(clip("* best  P Pareto front (acc@1 vs GFLOPs)  by val acc@1, mean ± std over seeds; "
                      "more: comparison.md", width))
    if any(r.values.get("data_bound") for r in rows):
        lines.append(clip(f"D data-bound (data wait >= {100 * DATA_BOUND_THRESHOLD:.0f}%): img/s measures the input "
                          "pipeline; use `vitsweep data cache` or more workers", width))
    if any(r.values.get("shared_gpu") for r in rows):
        lines.append(clip("S shared a GPU (--gpus-per-trial < 1): img/s and memory not comparable", width))
    return "\n".join(lines)
