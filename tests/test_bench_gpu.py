"""`vitsweep bench gpu`: refuses cleanly without CUDA, and its whole plumbing runs on a CPU
(`--device cpu --tiny`) as one command, writing gpu.json and gpu.md. The GPU figures themselves come
from a machine with a GPU (BENCHMARKS.md)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from orchestrator.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path, capsys):
    assert main(["bench", "gpu", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a CUDA device" in err and "--device cpu --tiny" in err
    assert not (tmp_path / "b").exists()  # nothing written before the check


@pytest.mark.parametrize("argv,message", [
    (["--budget-s", "nan"], "--budget-s=nan; allowed: a finite number > 0"),
    (["--batch", "0"], "--batch=0; allowed"),
    (["--device", "cpu"], "--device cpu runs only with --tiny"),
    (["--device", "tpu", "--tiny"], "--device='tpu'; allowed: cuda, cuda:N, or cpu with --tiny"),
    (["--device", "cpu", "--tiny", "--out", "{tmp}/file"], "is an existing file, not a directory"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["bench", "gpu", "--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_dry_run_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "bench", "gpu", "--out", str(out), "--device", "cpu", "--tiny",
         "--variants", "softmax", "performer", "--batch", "8", "--steps", "1", "--warmup", "1", "--jpegs", "16",
         "--workers", "0", "--data-seconds", "1", "--budget-s", "400"],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "gpu.json").read_text())
    assert data["finished"] and data["env"]["device"] == "cpu"
    rows = {(r["variant"], r["px"], r["mode"]): r for r in data["step"]}
    assert set(rows) == {(v, px, m) for v in ("softmax", "performer") for px in (32, 48) for m in ("eager", "compiled")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["img_s"] > 0 and row["forward_gflops_per_img"] > 0
        assert row["mfu"] is None and row["memory/peak_allocated_mb"] is None  # CPU: not available, never 0
    assert data["data"]["jpeg_img_s"] > 0 and data["data"]["cache_img_s"] > 0
    assert "sync: needs CUDA (torch.cuda.set_sync_debug_mode)" in data["skipped"]
    md = (out / "gpu.md").read_text()
    assert "| softmax | 48 | compiled |" in md and "decode-once cache" in md
    assert [p.name for p in out.iterdir()] and not any(p.name.startswith("vitsweep-bench-gpu-") for p in out.iterdir())
