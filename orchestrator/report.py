"""The comparison report of a sweep, rebuilt from what the experiment directory holds on disk.

Sources, per trial: Tune's experiment state (``experiment_state-*.json``: trial status, error file,
failures), the trial's ``params.json`` (config) and ``result.json`` (Tune's JSON-lines log of every
``tune.report``), and ``run/result.json`` written by `finetune` when a run ends. Nothing is re-run and
Ray is not started. Outputs in the experiment directory: ``comparison.md``, ``comparison.csv`` and
``plots/*.png`` (accuracy vs GMACs, accuracy vs peak memory, throughput per variant, learning curves).

Rows are variant configurations: trials whose configs differ only in ``seed`` are one row, with
mean ± std over seeds where there are several.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from trainables.layout import flatten_trial_config, trial_label
from finetune.errors import ReportError

RUN_SUBDIR = "run"  # trainables.finetune_trainable.RUN_SUBDIR (kept here so reports need no Ray import)
MARKER = "vitsweep_experiment.json"
ATTENTION_KEYS = ("rank", "share_kv", "features", "redraw_interval", "kernel", "landmarks", "pinv_iterations",
                  "conv_kernel", "dilation", "window", "fusion")
COLUMNS = ("variant", "config", "seeds", "acc1", "acc5", "params_m", "gmacs", "gflops", "peak_mem_mb",
           "train_img_s", "epochs", "status", "best")



@dataclass
class TrialRecord:
    trial_id: str
    path: Path
    label: str
    config: Dict[str, Any]
    status: str
    history: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None
    num_failures: int = 0

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def epochs_run(self) -> int:
        return int(self.final.get("epoch") or 0)


# ------------------------------------------------------------------------------------------ reading
def _read_json_lines(path: Path) -> List[Dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver; the complete lines still count
    return rows


def _history(trial_dir: Path) -> List[Dict[str, Any]]:
    """Per-epoch reports, one per epoch; a restored trial may report an epoch twice: the last wins.

    Tune rewrites its JSON log when it retries a failed trial, so the epochs before the retry survive
    only in the run's own ``run/result.json`` (its history includes the epochs restored from the
    checkpoint); both are read, Tune's rows over the run's.
    """
    by_epoch: Dict[Any, Dict[str, Any]] = {}
    run_result = trial_dir / RUN_SUBDIR / "result.json"
    if run_result.is_file():
        for row in json.loads(run_result.read_text()).get("history", []):
            # written by finetune.io_utils.write_json: non-finite floats are strings there; None as in Tune
            by_epoch[row.get("epoch")] = {k: None if v in ("nan", "inf", "-inf") else v for k, v in row.items()}
    for row in _read_json_lines(trial_dir / "result.json"):
        epoch = row.get("epoch", row.get("training_iteration"))
        by_epoch[epoch] = row
    return [by_epoch[k] for k in sorted(by_epoch, key=lambda e: (e is None, e))]


def _latest_state(exp_dir: Path) -> Optional[Dict[str, Any]]:
    states = sorted(exp_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    return json.loads(states[-1].read_text())


def _error_reason(trial_dir: Path, error_filename: Optional[str]) -> str:
    candidates = [trial_dir / error_filename] if error_filename else []
    candidates.append(trial_dir / "error.txt")
    for path in candidates:
        if path.is_file():
            lines = [l.strip() for l in path.read_text().splitlines() if l.strip()]
            if lines:
                return lines[-1][:200]
    return "unknown error (no error file)"


def _classify(status: str, history: List[Dict[str, Any]], config: Dict[str, Any], scheduler: str,
              error: Optional[str], run_status: Optional[str]) -> str:
    last = history[-1] if history else {}
    if status == "ERROR":
        return f"errored: {error}"
    if last.get("status") == "diverged" or run_status == "diverged":
        return "diverged"
    epochs = config.get("epochs")
    if run_status == "finished" or (epochs is not None and last.get("epoch") == epochs):
        return "finished"
    if status == "TERMINATED":
        return "stopped early (ASHA)" if scheduler == "asha" else "stopped early"
    return "unfinished"


def collect_trials(exp_dir: str | Path) -> List[TrialRecord]:
    """Every trial of the experiment in `exp_dir`, read from disk."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ReportError(f"{str(exp_dir)!r} is not a directory")
    marker = exp_dir / MARKER
    scheduler = json.loads(marker.read_text()).get("spec", {}).get("scheduler", "fifo") if marker.is_file() else "fifo"
    state = _latest_state(exp_dir)
    entries: List[Tuple[str, Path, Dict[str, Any], str, Optional[str], int]] = []
    if state is not None:
        for trial_json, runtime_json in state.get("trial_data", []):
            trial = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
            runtime = json.loads(runtime_json) if isinstance(runtime_json, str) else runtime_json
            entries.append((
                trial["trial_id"], exp_dir / trial["relative_logdir"], trial.get("config", {}), trial.get("status", ""),
                runtime.get("error_filename"), int(runtime.get("num_failures") or 0),
            ))
    else:  # no Tune state (copied trial folders): statuses come from the run outputs alone
        for params in sorted(exp_dir.glob("*/params.json")):
            status = "ERROR" if (params.parent / "error.txt").is_file() else "TERMINATED"
            entries.append((params.parent.name, params.parent, json.loads(params.read_text()), status, None, 0))
    if not entries:
        raise ReportError(f"{str(exp_dir)!r} holds no trials (is it a Ray Tune experiment directory?)")

    records = []
    for trial_id, trial_dir, config, status, error_filename, failures in entries:
        if not config:  # an empty-config trial from Ray's restored generator (see trainables.train_vit)
            continue
        history = _history(trial_dir)
        run_result = trial_dir / RUN_SUBDIR / "result.json"
        run_status = json.loads(run_result.read_text()).get("status") if run_result.is_file() else None
        flat = flatten_trial_config(config)
        error = _error_reason(trial_dir, error_filename) if status == "ERROR" else None
        records.append(TrialRecord(
            trial_id=trial_id, path=trial_dir, label=trial_label(config), config=flat,
            status=_classify(status, history, flat, scheduler, error, run_status),
            history=history, error=error, num_failures=failures,
        ))
    return records


# ------------------------------------------------------------------------------------------ grouping
def _freeze(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass
class Row:
    label: str
    variant: str
    config: str
    trials: List[TrialRecord]
    values: Dict[str, Any]
    best: bool = False

    def cell(self, column: str) -> str:
        return _format(column, self.values.get(column))


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


def build_rows(records: Sequence[TrialRecord]) -> List[Row]:
    """Group trials that differ only in seed; aggregate; mark the best configuration per variant."""
    varying = set()
    keys = {k for r in records for k in r.config}
    for key in keys - {"seed"}:
        if len({_freeze(r.config.get(key)) for r in records}) > 1:
            varying.add(key)
    groups: Dict[str, List[TrialRecord]] = {}
    for r in records:
        key = _freeze([r.label, {k: v for k, v in r.config.items() if k != "seed"}])
        groups.setdefault(key, []).append(r)

    rows = []
    for trials in groups.values():
        cfg = trials[0].config
        shown = {k: cfg[k] for k in sorted(varying | set(ATTENTION_KEYS))
                 if k != "variant" and cfg.get(k) is not None}
        acc1, acc1_std = _mean_std([t.final.get("val/acc1") for t in trials])
        acc5, acc5_std = _mean_std([t.final.get("val/acc5") for t in trials])
        train_ips, _ = _mean_std([t.final.get("throughput/train_img_s") for t in trials])
        params = _first(trials, "cost/params")
        epochs = sorted({t.epochs_run for t in trials})
        rows.append(Row(
            label=trials[0].label,
            variant=cfg.get("variant", "softmax"),
            config=", ".join(f"{k}={v}" for k, v in shown.items()),
            trials=trials,
            values={
                "variant": trials[0].label,
                "config": ", ".join(f"{k}={v}" for k, v in shown.items()) or "-",
                "seeds": ",".join(str(t.config.get("seed")) for t in trials),
                "acc1": (acc1, acc1_std),
                "acc5": (acc5, acc5_std),
                "params_m": params / 1e6 if params is not None else None,
                "gmacs": _first(trials, "cost/gmacs"),
                "gflops": _first(trials, "cost/gflops"),
                "peak_mem_mb": _first(trials, "memory/peak_allocated_mb"),
                "train_img_s": train_ips,
                "epochs": f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                "status": _status_summary(trials),
            },
        ))
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


# ------------------------------------------------------------------------------------------ outputs
HEADERS = {
    "variant": "variant", "config": "configuration", "seeds": "seeds", "acc1": "val acc@1", "acc5": "val acc@5",
    "params_m": "params (M)", "gmacs": "GMACs", "gflops": "GFLOPs", "peak_mem_mb": "peak mem (MB)",
    "train_img_s": "train img/s", "epochs": "epochs", "status": "status", "best": "best",
}


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row.cell(c).replace("|", "\\|") for c in COLUMNS]
        if row.best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "label", "configuration", "seeds", "n_trials", "acc1_mean", "acc1_std",
                         "acc5_mean", "acc5_std", "params", "gmacs", "gflops", "peak_mem_mb", "train_img_s",
                         "epochs", "status", "best", "trial_ids"])
        for r in rows:
            v = r.values
            writer.writerow([
                r.variant, r.label, v["config"], v["seeds"], len(r.trials), v["acc1"][0], v["acc1"][1], v["acc5"][0],
                v["acc5"][1], _first(r.trials, "cost/params"), v["gmacs"], v["gflops"], v["peak_mem_mb"],
                v["train_img_s"], v["epochs"], v["status"], r.best, " ".join(t.trial_id for t in r.trials),
            ])


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of points not dominated (lower cost and higher accuracy is better), by cost."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _scatter(rows: Sequence[Row], cost_key: str, xlabel: str, path: Path, empty_note: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r.values[cost_key], r.values["acc1"][0], r) for r in rows
           if r.values[cost_key] is not None and r.values["acc1"][0] is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    note = None
    if not pts:
        note = empty_note
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for cost, acc, row in pts:
            ax.scatter(cost, acc, s=50, marker="*" if row.best else "o")
            ax.annotate(f"{row.label} {row.values['config'] if row.values['config'] != '-' else ''}".strip(),
                        (cost, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = pareto_front([(c, a) for c, a, _ in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val acc@1")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return note


def write_plots(rows: Sequence[Row], records: Sequence[TrialRecord], plots_dir: Path) -> Dict[str, Optional[str]]:
    """PNG plots; returns {file name: note or None} (a note says why a plot has no points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    notes: Dict[str, Optional[str]] = {}
    notes["acc_vs_gmacs.png"] = _scatter(rows, "gmacs", "GMACs (forward, one image)", plots_dir / "acc_vs_gmacs.png",
                                         "no trial reported GMACs and accuracy")
    notes["acc_vs_peak_memory.png"] = _scatter(
        rows, "peak_mem_mb", "peak GPU memory (MB)", plots_dir / "acc_vs_peak_memory.png",
        "peak GPU memory is n/a: the trials ran on CPU (torch reports GPU memory only)",
    )

    fig, ax = plt.subplots(figsize=(7, 4))
    labelled = [(f"{r.label}\n{r.values['config']}" if r.values["config"] != "-" else r.label, r.values["train_img_s"])
                for r in rows if r.values["train_img_s"] is not None]
    if labelled:
        ax.bar(range(len(labelled)), [v for _, v in labelled])
        ax.set_xticks(range(len(labelled)), [l for l, _ in labelled], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("train images / s")
        notes["throughput.png"] = None
    else:
        notes["throughput.png"] = "no trial reported throughput"
        ax.text(0.5, 0.5, notes["throughput.png"], ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(plots_dir / "throughput.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for rec in records:
        points = [(h.get("epoch"), h.get("val/acc1")) for h in rec.history
                  if h.get("epoch") is not None and h.get("val/acc1") is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1,
                    label=f"{rec.label} seed={rec.config.get('seed')} ({rec.trial_id})")
            drawn += 1
    if drawn:
        ax.set_xlabel("epoch")
        ax.set_ylabel("val acc@1")
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
        notes["learning_curves.png"] = None
    else:
        notes["learning_curves.png"] = "no trial reported val/acc1"
        ax.text(0.5, 0.5, notes["learning_curves.png"], ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(plots_dir / "learning_curves.png", dpi=100)
    plt.close(fig)
    return notes


@dataclass
class Report:
    directory: Path
    rows: List[Row]
    records: List[TrialRecord]
    table: str
    markdown_path: Path
    csv_path: Path
    plots: Dict[str, Optional[str]]


def write_report(exp_dir: str | Path) -> Report:
    """Write comparison.md, comparison.csv and plots/ into `exp_dir`; returns what was written."""
    exp_dir = Path(exp_dir).resolve()
    records = collect_trials(exp_dir)
    rows = build_rows(records)
    table = markdown_table(rows)
    plots = write_plots(rows, records, exp_dir / "plots")
    csv_path = exp_dir / "comparison.csv"
    write_csv(rows, csv_path)

    lines = [f"# Sweep comparison: {exp_dir.name}", "",
             f"{len(records)} trials, {len(rows)} configurations (trials differing only in seed are one row; "
             "acc is the last reported epoch, mean ± std over seeds). Best configuration per variant in bold.", "",
             table, ""]
    errored = [r for r in records if r.error]
    if errored:
        lines += ["## Errors", ""] + [f"- `{r.trial_id}` ({r.label}): {r.error}" for r in errored] + [""]
    lines += ["## Plots", ""]
    for name, note in plots.items():
        lines.append(f"- [plots/{name}](plots/{name})" + (f": {note}" if note else ""))
    lines += ["", "## Logs", "",
              "TensorBoard (every trial writes scalars, hparams and a sample grid under `<trial>/run/tb`):", "",
              f"    tensorboard --logdir {exp_dir}", ""]
    md_path = exp_dir / "comparison.md"
    md_path.write_text("\n".join(lines))
    return Report(exp_dir, rows, records, table, md_path, csv_path, plots)
