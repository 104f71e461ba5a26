"""The report's PNG plots: accuracy vs cost (GMACs, peak memory) with the Pareto front, training
throughput per configuration, and learning curves (train loss and val acc@1).

Every figure is titled with the experiment, data set, epochs and seeds; points and bars carry error
bars over seeds (± std). A plot without data says why, in the image and in the returned note. The
throughput plot says when trials ran at the same time on shared CPUs or shared a GPU (their img/s
then depends on what else ran, so it is not comparable across configurations), and hatches the bars of
data-bound configurations (`finetune.timing`: their img/s measures the input pipeline).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .results import TrialRecord
from finetune.timing import DATA_BOUND_THRESHOLD

from .tables import Row, pareto_front, row_name

__all__ = ["pareto_front", "write_plots", "concurrent_trials"]

FONT = {"title": 11, "label": 10, "tick": 9, "note": 8}


def _values(records: Sequence[TrialRecord], key: str) -> List[Any]:
    return sorted({r.config.get(key) for r in records if r.config.get(key) is not None}, key=str)


def _joined(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values) or "n/a"


def plot_title(experiment: str, records: Sequence[TrialRecord]) -> str:
    """``<experiment>: data <spec>, <epochs> epochs, seeds <s1,s2>`` (several values joined by commas)."""
    return (f"{experiment}: data {_joined(_values(records, 'data'))}, {_joined(_values(records, 'epochs'))} epochs, "
            f"seeds {_joined(_values(records, 'seed'))}")


def on_cpu(records: Sequence[TrialRecord]) -> bool:
    """No trial measured device memory: they ran on CPUs (memory is measured on CUDA only)."""
    return not any(h.get("memory/peak_allocated_mb") is not None for r in records for h in r.history)


def concurrent_trials(records: Sequence[TrialRecord]) -> int:
    """The most trials that ran at the same time, from Tune's per-epoch ``timestamp`` and
    ``time_this_iter_s`` (1 when there is no timing information)."""
    events = []
    for rec in records:
        stamps = [(h["timestamp"], h.get("time_this_iter_s") or 0.0) for h in rec.history
                  if isinstance(h.get("timestamp"), (int, float))]
        if stamps:
            events += [(min(t - d for t, d in stamps), 1), (max(t for t, _ in stamps), -1)]
    running = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same second
        running += step
        most = max(most, running)
    return max(1, most)


def _style(ax: Any, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["tick"])
    ax.grid(alpha=0.3)


def _figure(path: Path, size: Tuple[float, float], title: str, drawn: bool, draw: Callable[[Any], None],
            empty_note: str, ncols: int = 1) -> Optional[str]:
    """Save one titled figure: `draw(axes)` where there is data, else `empty_note` in its middle;
    returns the note (None when drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols if drawn else 1, figsize=size if drawn else (size[0], 2.5), squeeze=False)
    fig.suptitle(title, fontsize=FONT["title"])
    if drawn:
        draw(axes[0] if ncols > 1 else axes[0][0])
    else:
        ax = axes[0][0]
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", wrap=True, fontsize=FONT["title"],
                transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    from finetune.io_utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return None if drawn else empty_note


def _accuracy_vs(rows: Sequence[Row], cost_key: str, xlabel: str, path: Path, title: str,
                 empty_note: str) -> Optional[str]:
    """val acc@1 (mean ± std over seeds) against one cost per configuration; the best configuration
    per variant as a star, the Pareto front dashed."""
    pts = [(r.values[cost_key], r.values["acc1"][0], r.values["acc1"][1] or 0.0, r) for r in rows
           if r.values[cost_key] is not None and r.values["acc1"][0] is not None]

    def draw(ax: Any) -> None:
        import matplotlib.pyplot as plt

        colours = plt.get_cmap("tab10")
        variants = sorted({row.variant for *_, row in pts})
        middle = (min(p[0] for p in pts) + max(p[0] for p in pts)) / 2
        for cost, acc, std, row in pts:
            colour = colours(variants.index(row.variant) % 10)
            ax.errorbar(cost, acc, yerr=std, fmt="*" if row.best else "o", ms=11 if row.best else 7, color=colour,
                        capsize=3, label=row.variant if row.best else None)
            right = cost > middle  # labels grow away from the nearer edge
            ax.annotate(row_name(row, " "), (cost, acc), fontsize=FONT["note"], xytext=(-6 if right else 6, 5),
                        textcoords="offset points", ha="right" if right else "left")
        front = pareto_front([(c, a) for c, a, _, _ in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, marker="o", ms=16,
                mfc="none", label="Pareto front")  # rings: a one-point front is visible too
        _style(ax, xlabel, "val acc@1 (mean ± std over seeds)")
        ax.legend(loc="best", fontsize=FONT["note"])

    return _figure(path, (8, 5.5), title, bool(pts), draw, empty_note)


def _seed_std(row: Row, key: str) -> float:
    values = [t.final[key] for t in row.trials if isinstance(t.final.get(key), (int, float))]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def throughput_warning(records: Sequence[TrialRecord]) -> Optional[str]:
    """Why throughput is not comparable across configurations, or None."""
    together = concurrent_trials(records)
    if together > 1 and on_cpu(records):
        return (f"up to {together} trials ran at once on shared CPUs: img/s depends on what ran beside each "
                "trial and is not comparable across configurations (measure with --max-concurrent 1)")
    return shared_gpu_warning(records, "img/s")


def shared_gpu_warning(records: Sequence[TrialRecord], what: str) -> Optional[str]:
    """Why `what` (img/s, memory) is not comparable when trials shared a GPU, or None."""
    shared = sorted({r.gpus_per_trial for r in records if r.shared_gpu})
    if not shared:
        return None
    return (f"trials shared a GPU ({'/'.join(f'{g:g}' for g in shared)} GPU per trial): {what} depends on what ran "
            "beside each trial and is not comparable across configurations (measure with --gpus-per-trial 1)")


def data_bound_note(rows: Sequence[Row]) -> Optional[str]:
    """Which configurations were data-bound (hatched bars), or None."""
    bound = [row_name(r) for r in rows if r.values.get("data_bound")]
    if not bound:
        return None
    return (f"hatched: data-bound (data wait >= {100 * DATA_BOUND_THRESHOLD:.0f}%), img/s measures the input "
            f"pipeline: {', '.join(bound)}; use `vitsweep data cache` or more workers")


def _throughput(rows: Sequence[Row], records: Sequence[TrialRecord], path: Path, title: str) -> Optional[str]:
    shown = [r for r in rows if r.values["train_img_s"] is not None]
    bars = [(row_name(r, "\n"), r.values["train_img_s"], _seed_std(r, "throughput/train_img_s")) for r in shown]
    warning = "; ".join(n for n in (throughput_warning(records), data_bound_note(shown)) if n) or None

    def draw(ax: Any) -> None:
        drawn = ax.bar(range(len(bars)), [v for _, v, _ in bars], yerr=[s for *_, s in bars], capsize=3, color="tab:blue")
        for patch, row in zip(drawn, shown):
            if row.values.get("data_bound"):
                patch.set_hatch("//")
                patch.set_facecolor("tab:orange")
        steps = [(i, r.values["compute_img_s"]) for i, r in enumerate(shown) if r.values.get("compute_img_s")]
        if steps:  # what the model step alone would do: the gap to the bar is time spent outside it
            ax.plot([i for i, _ in steps], [v for _, v in steps], "k_", ms=22, mew=2, label="model step alone")
            ax.legend(fontsize=FONT["note"], loc="best")
        ax.set_xticks(range(len(bars)), [name for name, _, _ in bars], rotation=30, ha="right",
                      fontsize=FONT["tick"])
        _style(ax, "", "train images / s, end to end (mean ± std over seeds)")
        ax.grid(axis="x", visible=False)
        if warning:
            ax.set_title("WARNING: " + warning, fontsize=FONT["note"], color="firebrick", wrap=True)

    note = _figure(path, (8, 5), title, bool(bars), draw, "no trial reported throughput")
    return note or warning


def _curves(rows: Sequence[Row], metric: str) -> List[Tuple[str, List[int], List[float], List[float]]]:
    """Per configuration: (name, epochs, mean over seeds, std over seeds) of `metric`."""
    out = []
    for row in rows:
        by_epoch: Dict[int, List[float]] = {}
        for trial in row.trials:
            for h in trial.history:
                if isinstance(h.get("epoch"), (int, float)) and isinstance(h.get(metric), (int, float)):
                    by_epoch.setdefault(int(h["epoch"]), []).append(float(h[metric]))
        if by_epoch:
            epochs = sorted(by_epoch)
            means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
            stds = [math.sqrt(sum((v - m) ** 2 for v in by_epoch[e]) / (len(by_epoch[e]) - 1))
                    if len(by_epoch[e]) > 1 else 0.0 for e, m in zip(epochs, means)]
            out.append((row_name(row, " "), epochs, means, stds))
    return out


def _learning_curves(rows: Sequence[Row], path: Path, title: str) -> Optional[str]:
    panels = [("train/loss", "train loss"), ("val/acc1", "val acc@1")]
    curves = {metric: _curves(rows, metric) for metric, _ in panels}

    def draw(axes: Any) -> None:
        from matplotlib.ticker import MaxNLocator

        for ax, (metric, name) in zip(axes, panels):
            for label, epochs, means, stds in curves[metric]:
                line, = ax.plot(epochs, means, marker="o", ms=4, lw=1.5, label=label)
                if any(stds):
                    ax.fill_between(epochs, [m - s for m, s in zip(means, stds)],
                                    [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            _style(ax, "epoch", f"{name} (mean ± std over seeds)")
        axes[1].legend(fontsize=FONT["note"], loc="best")

    return _figure(path, (11, 4.8), title, any(curves.values()), draw, "no trial reported train/loss or val/acc1",
                   ncols=2)


def write_plots(rows: Sequence[Row], records: Sequence[TrialRecord], plots_dir: Path) -> Dict[str, Optional[str]]:
    """PNG plots; returns {file name: note or None} (a note says why a plot has no points, or why its
    numbers are not comparable)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    title = plot_title(plots_dir.resolve().parent.name, records)
    memory_note = ("peak GPU memory is n/a: the trials ran on CPU, and memory is not measured on CPU "
                   "(CUDA devices only)" if on_cpu(records) else "no trial reported peak memory and accuracy")
    shared_memory = shared_gpu_warning(records, "peak memory")
    memory_title = f"{title}\nNOT COMPARABLE: {shared_memory}" if shared_memory else title
    return {
        "acc_vs_gmacs.png": _accuracy_vs(rows, "gmacs", "GMACs (forward, one image)", plots_dir / "acc_vs_gmacs.png",
                                         title, "no trial reported GMACs and accuracy"),
        "acc_vs_peak_memory.png": _accuracy_vs(rows, "peak_mem_mb", "peak GPU memory (MB)",
                                               plots_dir / "acc_vs_peak_memory.png", memory_title, memory_note)
        or shared_memory,
        "throughput.png": _throughput(rows, records, plots_dir / "throughput.png", title),
        "learning_curves.png": _learning_curves(rows, plots_dir / "learning_curves.png", title),
    }
