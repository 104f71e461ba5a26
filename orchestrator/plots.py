"""The report's PNG plots: accuracy vs cost (GMACs, peak memory) with the Pareto front, training
throughput per configuration, and learning curves. A plot without data says why, in the image and
in the returned note."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .results import TrialRecord
from .tables import Row


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


def _row_name(row: Row, sep: str) -> str:
    config = row.values["config"]
    if config == "-":
        return row.label
    if config.startswith(f"{row.label} "):  # the variant's label already names the row
        return config
    return f"{row.label}{sep}{config}"


def _figure(path: Path, size: Tuple[float, float], drawn: bool, draw: Callable[[Any], None],
            empty_note: str) -> Optional[str]:
    """Save one figure: `draw(ax)` where there is data, else `empty_note` in its middle; returns the note."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    if drawn:
        draw(ax)
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None if drawn else empty_note


def _accuracy_vs(rows: Sequence[Row], cost_key: str, xlabel: str, path: Path, empty_note: str) -> Optional[str]:
    """Scatter of val acc@1 against one cost per configuration, the best per variant as a star."""
    pts = [(r.values[cost_key], r.values["acc1"][0], r) for r in rows
           if r.values[cost_key] is not None and r.values["acc1"][0] is not None]

    def draw(ax: Any) -> None:
        for cost, acc, row in pts:
            ax.scatter(cost, acc, s=50, marker="*" if row.best else "o")
            ax.annotate(_row_name(row, " "), (cost, acc), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = pareto_front([(c, a) for c, a, _ in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val acc@1")
        ax.legend(loc="best")
        ax.grid(alpha=0.3)

    return _figure(path, (7, 5), bool(pts), draw, empty_note)


def _throughput(rows: Sequence[Row], path: Path) -> Optional[str]:
    bars = [(_row_name(r, "\n"), r.values["train_img_s"]) for r in rows if r.values["train_img_s"] is not None]

    def draw(ax: Any) -> None:
        ax.bar(range(len(bars)), [v for _, v in bars])
        ax.set_xticks(range(len(bars)), [name for name, _ in bars], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("train images / s")

    return _figure(path, (7, 4), bool(bars), draw, "no trial reported throughput")


def _learning_curves(records: Sequence[TrialRecord], path: Path) -> Optional[str]:
    curves = []
    for rec in records:
        points = [(h["epoch"], h["val/acc1"]) for h in rec.history
                  if h.get("epoch") is not None and h.get("val/acc1") is not None]
        if points:
            curves.append((f"{rec.label} seed={rec.config.get('seed')} ({rec.trial_id})", points))

    def draw(ax: Any) -> None:
        for label, points in curves:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, lw=1, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val acc@1")
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)

    return _figure(path, (7, 5), bool(curves), draw, "no trial reported val/acc1")


def write_plots(rows: Sequence[Row], records: Sequence[TrialRecord], plots_dir: Path) -> Dict[str, Optional[str]]:
    """PNG plots; returns {file name: note or None} (a note says why a plot has no points)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    return {
        "acc_vs_gmacs.png": _accuracy_vs(rows, "gmacs", "GMACs (forward, one image)", plots_dir / "acc_vs_gmacs.png",
                                         "no trial reported GMACs and accuracy"),
        "acc_vs_peak_memory.png": _accuracy_vs(
            rows, "peak_mem_mb", "peak GPU memory (MB)", plots_dir / "acc_vs_peak_memory.png",
            "peak GPU memory is n/a: the trials ran on CPU (torch reports GPU memory only)",
        ),
        "throughput.png": _throughput(rows, plots_dir / "throughput.png"),
        "learning_curves.png": _learning_curves(records, plots_dir / "learning_curves.png"),
    }
