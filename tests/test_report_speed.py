"""The report marks speed figures that do not compare: data-bound trials (`finetune.timing`) and trials
that shared a GPU (resources.gpu < 1), in comparison.md/.csv, the console table and the plots."""

from __future__ import annotations

import csv
import json

from test_report import _epoch, make_experiment

from orchestrator.report import write_report
from orchestrator.tables import console_table


def _row(epoch, acc1, wait, step_ips, ips=100.0, memory=900.0):
    return {**_epoch(epoch, acc1, ips=ips, status="finished"), "time/data_wait_frac": wait,
            "throughput/compute_img_s": step_ips, "memory/peak_allocated_mb": memory}


def _experiment(tmp_path, gpu):
    exp = make_experiment(tmp_path, [
        ("a0", {"variant": "softmax", "lr": 1e-3, "epochs": 1}, "TERMINATED", [_row(1, 0.8, 0.62, 400.0)], None,
         "finished"),
        ("b0", {"variant": "performer", "lr": 1e-3, "epochs": 1}, "TERMINATED", [_row(1, 0.7, 0.04, 120.0)], None,
         "finished"),
    ])
    marker = exp / "vitsweep_experiment.json"
    data = json.loads(marker.read_text())
    data["spec"]["resources"] = {"cpu": 1, "gpu": gpu}
    marker.write_text(json.dumps(data))
    return exp


def test_data_bound_and_shared_gpu_rows_are_marked_everywhere(tmp_path):
    report = write_report(_experiment(tmp_path, 0.5))
    md = report.markdown_path.read_text()
    assert "| step img/s | data wait |" in md
    assert "100.0†‡ | 400.0† | 62%‡ |" in md and "100.0† | 120.0† | 4% |" in md
    assert "‡ data-bound (data wait >= 30%)" in md and "vitsweep data cache" in md
    assert "† trials shared a GPU (0.5 GPU per trial)" in md and "not comparable" in md
    assert "900†" in md  # memory too

    with report.csv_path.open(newline="") as fh:
        rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert rows["softmax"]["data_bound"] == "True" and rows["performer"]["data_bound"] == "False"
    assert float(rows["softmax"]["data_wait_frac"]) == 0.62 and float(rows["softmax"]["compute_img_s"]) == 400.0
    assert rows["softmax"]["shared_gpu"] == "0.5"

    console = console_table(report.rows)
    softmax_line = next(line for line in console.splitlines() if " softmax" in line)
    assert softmax_line.rstrip().endswith("DS")
    assert "D data-bound" in console and "S shared a GPU" in console

    assert "data-bound" in report.plots["throughput.png"] and "shared a GPU" in report.plots["throughput.png"]
    assert "shared a GPU" in report.plots["acc_vs_peak_memory.png"]


def test_whole_gpus_and_a_fast_pipeline_carry_no_mark(tmp_path):
    exp = make_experiment(tmp_path, [
        ("a0", {"variant": "softmax", "lr": 1e-3, "epochs": 1}, "TERMINATED", [_row(1, 0.8, 0.05, 400.0)], None,
         "finished"),
    ])
    report = write_report(exp)
    md = report.markdown_path.read_text()
    assert "†" not in md and "‡" not in md and "data-bound" not in md
    assert report.plots["throughput.png"] is None
    assert "D data-bound" not in console_table(report.rows)
