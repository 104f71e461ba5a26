"""The comparison report of a sweep, rebuilt from what the experiment directory holds on disk.

Nothing is re-run and Ray is not started. An experiment in an object store is reported from a local
copy of its small files (`report_storage`): the report is built there and uploaded back. `results` reads the trials, `tables` groups them into one
row per configuration (trials that differ only in ``seed``; mean ± std over seeds), `plots` draws
them, `report_html` writes the interactive page. Outputs in the experiment directory: ``comparison.md``,
``comparison.csv``, ``comparison.html`` and ``plots/*.png`` (accuracy vs GMACs, accuracy vs peak memory,
throughput per variant, learning curves).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

from finetune.errors import ConfigError, ReportError
from finetune.io_utils import atomic_path
from finetune.outputs import OutputDir, check_output_dir

from .plots import write_plots
from .report_html import write_html
from .results import MARKER, TrialRecord, collect_trials
from .storage import Storage
from .tables import Row, build_rows, markdown_table, write_csv

__all__ = ["MARKER", "Report", "report_storage", "write_report"]

_logger = logging.getLogger(__name__)

REPORT_FILES = ("comparison.md", "comparison.csv")
HTML_FILE = "comparison.html"  # uploaded with the report; not a report input (4-5 MB: plotly.js inside)
PLOTS_DIR = "plots"
# What a report (and TensorBoard) needs from an experiment: Tune's state and logs, each trial's params,
# run/result.json, error and TensorBoard events; never checkpoints or weights.
_SMALL_FILES = frozenset({MARKER, *REPORT_FILES, "result.json", "params.json", "params.pkl", "progress.csv",
                          "error.txt", "error.pkl", "preprocessing.json", "weights.json"})
_SMALL_PATTERN = re.compile(r"^(experiment_state-.*\.json|basic-variant-state-.*\.json|events\.out\.tfevents\..*)$")


@dataclass
class Report:
    directory: Path
    rows: List[Row]
    records: List[TrialRecord]
    table: str
    markdown_path: Path
    csv_path: Path
    plots: Dict[str, Optional[str]]
    partial: bool = False  # written beside a richer report that was kept (`finished_in_csv`)


def dashboard_lines(records: List[TrialRecord]) -> List[str]:
    """Where each trial is in the Ray dashboard: its run label, Tune's trial id, and the worker process
    (PID and node, from Tune's results) that ran its last reported epoch (docs/dashboard.md)."""
    rows = [r for r in records if r.final.get("pid") is not None]
    if not rows:
        return []
    lines = ["## Trials in the Ray dashboard", "",
             "Each trial ran as a Tune actor (class `ImplicitFunc` on the dashboard's Actors page) in the worker "
             "process below; its log file is `worker-*-<PID>.out` in that node's Ray session `logs/`, its console "
             "lines are prefixed `(<label> <trial id> pid=<PID>)`, and its live metrics are the `ray_vitsweep_*` "
             "series tagged with its `trial_id` and `label` (docs/dashboard.md).", "",
             "| label | trial id | PID | node |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.path.name):
        label = r.path.name[: -len(r.trial_id) - 1] if r.path.name.endswith("_" + r.trial_id) else r.label
        lines.append(f"| {label} | `{r.trial_id}` | {r.final.get('pid')} | {r.final.get('node_ip', '')} |")
    return lines + [""]


def _markdown(exp_dir: Path, records: List[TrialRecord], rows: List[Row], table: str,
              plots: Dict[str, Optional[str]], uri: Optional[str], plots_dir: str = PLOTS_DIR) -> str:
    lines = [f"# Sweep comparison: {exp_dir.name}", ""]
    if uri is not None:
        lines += [f"Experiment: `{uri}`", ""]
    lines += [
             f"{len(records)} trials, {len(rows)} configurations (trials differing only in seed are one row; "
             "acc is the last reported epoch, mean ± std over seeds). Best configuration per variant in bold.", "",
             table, ""]
    errored = [r for r in records if r.error]
    if errored:
        lines += ["## Errors", ""] + [f"- `{r.trial_id}` ({r.label}): {r.error}" for r in errored] + [""]
    lines += dashboard_lines(records)
    page = f"comparison{plots_dir[len(PLOTS_DIR):]}.html"
    lines += ["## Plots", "", f"- [{page}]({page}): interactive Pareto fronts (acc@1 vs GFLOPs, training memory, "
              "inference latency and img/s), learning curves and a sortable table; self-contained, opens offline"]
    for name, note in plots.items():
        lines.append(f"- [{plots_dir}/{name}]({plots_dir}/{name})" + (f": {note}" if note else ""))
    lines += ["", "## Logs", "",
              "TensorBoard (every trial writes scalars, hparams and a sample grid under `<trial>/run/tb`):", ""]
    if uri is None:
        lines += [f"    tensorboard --logdir {exp_dir}", ""]
    else:
        lines += [f"    vitsweep report '{uri}' --out DIR && tensorboard --logdir DIR", ""]
    return "\n".join(lines)


def write_report(exp_dir: str | Path, *, uri: Optional[str] = None) -> Report:
    """Write comparison.md, comparison.csv and plots/ into `exp_dir`; returns what was written. `uri`:
    where the experiment lives when `exp_dir` is a local copy of it (named in comparison.md)."""
    exp_dir = Path(exp_dir).resolve()
    records = collect_trials(exp_dir)
    rows = build_rows(records)
    table = markdown_table(rows)
    # Never replace a report with a poorer one: fewer finished trials than the existing comparison.csv
    # (a resume of a damaged experiment, a partial copy) goes beside it as comparison.partial.*.
    kept = finished_in_csv(exp_dir / "comparison.csv")
    finished = sum(1 for r in records if r.status == "finished")
    partial = kept > finished
    suffix = ".partial" if partial else ""
    plots_dir = PLOTS_DIR + suffix
    plots = write_plots(rows, records, exp_dir / plots_dir)
    csv_path = exp_dir / f"comparison{suffix}.csv"
    with atomic_path(csv_path) as tmp:
        write_csv(rows, Path(tmp))
    write_html(rows, records, exp_dir / f"comparison{suffix}{Path(HTML_FILE).suffix}")
    md_path = exp_dir / f"comparison{suffix}.md"
    with atomic_path(md_path) as tmp:
        Path(tmp).write_text(_markdown(exp_dir, records, rows, table, plots, uri, plots_dir))
    if partial:
        _logger.warning("kept %s (%d finished trials); this report has %d finished trials and was written to %s",
                        exp_dir / "comparison.md", kept, finished, md_path)
    return Report(exp_dir, rows, records, table, md_path, csv_path, plots, partial)


def _check_writable_in_place(exp_dir: Path) -> None:
    """A report in place needs a writable experiment directory: a read-only one is refused in one line
    (with where to write the report instead) before anything is read or written."""
    if exp_dir.is_dir() and not os.access(exp_dir, os.W_OK | os.X_OK):
        ro = bool(os.statvfs(exp_dir).f_flag & os.ST_RDONLY)
        why = "is on a read-only filesystem" if ro else "is not writable"
        raise ReportError(f"experiment {str(exp_dir)!r} {why}, so the report cannot be written into it; "
                          f"write it elsewhere: vitsweep report {str(exp_dir)!r} --out NEW_DIR")


def finished_in_csv(path: Path) -> int:
    """Finished trials in a comparison.csv: per row, the count of trials whose status is "finished"
    (a status of "finished" counts every trial; "2x finished; 1x unfinished" counts 2). 0 when the file
    is missing or unreadable (then nothing of value is lost by replacing it)."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0
    total = 0
    for row in rows:
        status = row.get("status") or ""
        n_trials = row.get("n_trials") or ""
        if status == "finished":
            total += int(n_trials) if n_trials.isdigit() else 1
            continue
        for part in status.split("; "):
            count, sep, what = part.partition("x ")
            if sep and what == "finished" and count.isdigit():
                total += int(count)
    return total


def is_report_input(rel: str) -> bool:
    """`rel` (a path inside an experiment) is one of the small files a report or TensorBoard reads."""
    parts = PurePosixPath(rel).parts
    if any(p.startswith("checkpoint_") for p in parts):
        return False
    if parts and parts[0] == PLOTS_DIR:
        return True
    name = parts[-1] if parts else ""
    return name in _SMALL_FILES or bool(_SMALL_PATTERN.match(name))


@dataclass
class StorageReport:
    """A report of the experiment at `experiment`, built in `local_dir`; `uploaded`: the report files
    went back to the experiment (None: built in place; else True, or the reason it could not)."""

    experiment: Storage
    local_dir: Path
    report: Report
    uploaded: Optional[object]


def report_storage(exp: Storage, out: Optional[str | Path] = None) -> Tuple[Report, Path]:
    """The report of the experiment `exp` (a local directory or a URI); returns it and the local
    directory it was built in. See `build_storage_report`."""
    built = build_storage_report(exp, out)
    return built.report, built.local_dir


def build_storage_report(exp: Storage, out: Optional[str | Path] = None) -> StorageReport:
    """Build the report of `exp` from any machine that can read it.

    A local experiment without `out` is reported in place. Otherwise the small files (`is_report_input`:
    Tune's state and logs, params, run/result.json, errors, TensorBoard events; no checkpoints) are
    copied to `out` (a new temp directory when None), the report is built there, and comparison.md,
    comparison.csv and plots/ are uploaded back to `exp` when it accepts writes. `tensorboard --logdir`
    works on the local directory afterwards.
    """
    if exp.is_local and out is not None and Path(out).expanduser().resolve() == Path(exp.path).resolve():
        out = None  # --out is the experiment itself: in place
    if exp.is_local and out is None:
        _check_writable_in_place(Path(exp.path))
        return StorageReport(exp, Path(exp.path), write_report(exp.path), None)
    if not exp.is_dir():
        raise ReportError(f"{exp.uri!r} does not exist or holds nothing")
    if out is None:
        local = Path(tempfile.mkdtemp(prefix=f"vitsweep-report-{PurePosixPath(exp.path).name}-"))
        OutputDir(local, "report", reused=False).claim({"experiment": exp.uri})
    else:
        try:  # the output rule: a new or empty directory, or an earlier report's copy; never another experiment
            target = check_output_dir(out, "report")
        except ConfigError as err:
            raise ReportError(str(err)) from None
        local = target.claim({"experiment": exp.uri}).resolve()
    exp.download_dir("", local, include=is_report_input)
    report = write_report(local, uri=None if exp.is_local else exp.uri)
    try:
        for name in (*REPORT_FILES, HTML_FILE):
            exp.write_bytes(name, (local / name).read_bytes())
        if (local / PLOTS_DIR).is_dir():
            exp.upload_dir(local / PLOTS_DIR, PLOTS_DIR)
    except OSError as err:  # a read-only bucket or directory: the local report stands
        _logger.warning("could not upload the report to %s: %s", exp.uri, err)
        return StorageReport(exp, local, report, f"not uploaded: {err}")
    return StorageReport(exp, local, report, True)
