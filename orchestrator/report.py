"""The comparison report of a sweep, rebuilt from what the experiment directory holds on disk.

Nothing is re-run and Ray is not started. `results` reads the trials, `tables` groups them into one
row per configuration (trials that differ only in ``seed``; mean ± std over seeds), `plots` draws
them. Outputs in the experiment directory: ``comparison.md``, ``comparison.csv`` and ``plots/*.png``
(accuracy vs GMACs, accuracy vs peak memory, throughput per variant, learning curves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .plots import write_plots
from .results import MARKER, TrialRecord, collect_trials
from .tables import Row, build_rows, markdown_table, write_csv

__all__ = ["MARKER", "Report", "write_report"]


@dataclass
class Report:
    directory: Path
    rows: List[Row]
    records: List[TrialRecord]
    table: str
    markdown_path: Path
    csv_path: Path
    plots: Dict[str, Optional[str]]


def _markdown(exp_dir: Path, records: List[TrialRecord], rows: List[Row], table: str,
              plots: Dict[str, Optional[str]]) -> str:
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
    return "\n".join(lines)


def write_report(exp_dir: str | Path) -> Report:
    """Write comparison.md, comparison.csv and plots/ into `exp_dir`; returns what was written."""
    exp_dir = Path(exp_dir).resolve()
    records = collect_trials(exp_dir)
    rows = build_rows(records)
    table = markdown_table(rows)
    plots = write_plots(rows, records, exp_dir / "plots")
    csv_path = exp_dir / "comparison.csv"
    write_csv(rows, csv_path)
    md_path = exp_dir / "comparison.md"
    md_path.write_text(_markdown(exp_dir, records, rows, table, plots))
    return Report(exp_dir, rows, records, table, md_path, csv_path, plots)
