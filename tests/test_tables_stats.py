"""The comparison table's statistics: 95 % t-intervals, Welch's test against softmax, the budget
line, and the accuracy at the swap."""

from __future__ import annotations

import math

import pytest

from orchestrator import tables
from orchestrator.report import write_report
from orchestrator.results import collect_trials
from orchestrator.tables import build_rows, confidence_interval, t_quantile, welch_compare
from test_report import _epoch, cfg, make_experiment


def test_t_quantiles_with_and_without_scipy(monkeypatch):
    import builtins

    assert t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert t_quantile(2) == 4.303 and t_quantile(2.7) == 4.303 and t_quantile(45) == 1.96


def test_confidence_interval_and_welch():
    low, high = confidence_interval([0.5, 0.7])
    assert (low + high) / 2 == pytest.approx(0.6)
    assert high - 0.6 == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), rel=1e-3)
    assert confidence_interval([0.5]) is None
    assert welch_compare([0.50, 0.51, 0.49], [0.50, 0.52, 0.48]) == "≈"
    assert welch_compare([0.80, 0.81, 0.79], [0.50, 0.52, 0.48]) == "+"
    assert welch_compare([0.20, 0.21, 0.19], [0.50, 0.52, 0.48]) == "−"
    assert welch_compare([0.5], [0.5, 0.6]) is None


def _curve(acc, swap=None, epochs=3):
    rows = [_epoch(i + 1, acc, status="finished" if i == epochs - 1 else "running") for i in range(epochs)]
    if swap is not None:
        for r in rows:
            r["swap/acc1"] = swap
    return rows


def test_table_marks_noise_swap_and_equal_budgets(tmp_path):
    exp = make_experiment(tmp_path, [
        ("s0", cfg("softmax", seed=0), "TERMINATED", _curve(0.60, 0.60), None, "finished"),
        ("s1", cfg("softmax", seed=1), "TERMINATED", _curve(0.62, 0.62), None, "finished"),
        ("s2", cfg("softmax", seed=2), "TERMINATED", _curve(0.61, 0.61), None, "finished"),
        ("p0", cfg("performer", seed=0, features=16), "TERMINATED", _curve(0.59, 0.10), None, "finished"),
        ("p1", cfg("performer", seed=1, features=16), "TERMINATED", _curve(0.63, 0.12), None, "finished"),
        ("p2", cfg("performer", seed=2, features=16), "TERMINATED", _curve(0.60, 0.11), None, "finished"),
        ("l0", cfg("linformer", seed=0, rank=8), "TERMINATED", _curve(0.30, 0.05), None, "finished"),
        ("l1", cfg("linformer", seed=1, rank=8), "TERMINATED", _curve(0.31, 0.05), None, "finished"),
    ])
    rows = {r.variant: r for r in build_rows(collect_trials(exp))}
    assert rows["performer"].cell("vs_softmax") == "≈" and rows["linformer"].cell("vs_softmax") == "−"
    assert rows["softmax"].cell("vs_softmax") == "—"
    assert rows["performer"].cell("swap_acc1") == "0.110 ± 0.010"
    md = write_report(exp).markdown_path.read_text()
    assert "| acc@1 at swap |" in md and "Welch's t-test" in md
    assert "Budgets were equal across variants (epochs=3, lr grid=0.001)." in md
    csv_text = (exp / "comparison.csv").read_text()
    assert "acc1_ci_low" in csv_text and "swap_acc1_mean" in csv_text


def test_budget_line_names_the_key_that_differs(tmp_path):
    exp = make_experiment(tmp_path, [
        ("s0", cfg("softmax", epochs=3), "TERMINATED", _curve(0.6), None, "finished"),
        ("p0", cfg("performer", epochs=2, lr=3e-3, features=16), "TERMINATED", _curve(0.5, epochs=2), None, "finished"),
    ])
    line = tables.budget_line(build_rows(collect_trials(exp)))
    assert line.startswith("Budgets were NOT equal") and "epochs (" in line and "lr grid (" in line
    md = write_report(exp).markdown_path.read_text()
    assert "acc@1 at swap" not in md  # no trial reported it
