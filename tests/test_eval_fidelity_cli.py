"""`vitsweep eval` and `vitsweep fidelity` end to end on a tiny random model and synthetic data, and
`eval_at_start` (the accuracy at the swap without changing what training computes)."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.config import TrainConfig
from finetune.train import run_training
from orchestrator.cli import main

DATA = "synthetic:classes=4,size=32,n=32,n_val=16"
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4", "--depth", "2"]
TRAIN = dict(model="vit_tiny_patch16_224", pretrained=False, pretrained_tag=None, img_size=32, patch_size=4, depth=2,
             data=DATA, augment="none", num_workers=0, epochs=2, batch_size=16, warmup_epochs=0.5, device="cpu",
             topk=(1, 2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("softmax_run")
    result = run_training(TrainConfig.from_dict(TRAIN), out, progress=False)
    return out, result


def _tags(tb_dir):
    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitsweep: error:"), err
    return err[0]


def test_eval_saved_weights_reproduces_the_runs_final_accuracy(softmax_run, tmp_path, capsys):
    run_dir, result = softmax_run
    assert main(["eval", "--weights", str(run_dir), "--data", DATA, "--topk", "1", "2", "--batch-size", "16",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert saved["val/acc1"] == result["metrics"]["val/acc1"]
    assert saved["val/loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-5)
    for key in ("cost/params", "cost/gflops", "throughput/eval_img_s", "memory/peak_allocated_mb", "val/acc2"):
        assert key in saved
    assert {"val/acc1", "val/loss", "cost/gflops"} <= set(_tags(tmp_path / "tb").Tags()["scalars"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["variant"] == "softmax"


def test_eval_swapped_into_another_variant(softmax_run, capsys):
    run_dir, _ = softmax_run
    args = ["eval", "--weights", str(run_dir / "weights.safetensors"), "--data", DATA, "--topk", "1", "--device", "cpu"]
    assert main([*args, "--variant", "performer", "--attn", "features=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["variant"] == "performer" and out["attn"] == {"features": 16}
    assert 0.0 <= out["val/acc1"] <= 1.0
    assert main([*args, "--variant", "linformer", "--attn", "rank=16"]) == 0  # E, F start fresh


@pytest.mark.parametrize("extra,needle", [
    (["--variant", "performr"], "unknown attention variant 'performr'"),
    (["--variant", "performer", "--attn", "features=0"], "features=0"),
    (["--variant", "performer", "--attn", "features"], "expected KEY=VALUE"),
    (["--attn", "features=8"], "--attn needs --variant"),
])
def test_eval_bad_input_exits_2_with_one_line(softmax_run, capsys, extra, needle):
    run_dir, _ = softmax_run
    assert main(["eval", "--weights", str(run_dir), "--data", DATA, "--device", "cpu", *extra]) == 2
    assert needle in _one_line_error(capsys)


def test_eval_missing_weights_exits_2(tmp_path, capsys):
    assert main(["eval", "--weights", str(tmp_path / "nope.safetensors"), "--data", DATA]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["eval", "--weights", str(tmp_path), "--data", DATA]) == 2
    assert "holds no weights.safetensors" in _one_line_error(capsys)


def test_fidelity_end_to_end_on_a_random_model(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["fidelity", *TINY, "--data", DATA, "--batches", "1", "--batch-size", "4", "--out", str(out),
                 "--variant", "performer", "--attn", "features=16", "--variant", "atrous_linear", "--attn", "features=16",
                 "--variants", "softmax,nystrom"]) == 0
    md = (out / "fidelity.md").read_text()
    assert "performer" in md and "atrous_linear" in md and "n/a" in md
    rows = json.loads((out / "fidelity.json").read_text())["rows"]
    assert {r["block"] for r in rows} == {0, 1} and len(rows) == 8
    softmax = [r for r in rows if r["variant"] == "softmax"]
    assert all(r["rel_err"] < 1e-5 and r["coverage"] == 1.0 for r in softmax)
    atrous = [r for r in rows if r["variant"] == "atrous_linear"]
    assert all(0 < r["coverage"] < 1 for r in atrous)
    assert (out / "fidelity.csv").read_text().startswith("block,variant,label,rel_err,coverage,logit_std")
    assert sorted(p.name for p in (out / "maps").glob("*.png")) == sorted(
        ["performer_m=16_kernel=softmax.png", "atrous_linear_dil=1_2_3_w=3_m=16_fusion=sum.png", "softmax.png",
         "nystrom_m=32_pinv=6.png"])
    acc = _tags(out / "tb")
    scalars = acc.Tags()["scalars"]
    assert "fidelity/logit_std" in scalars and "fidelity/performer_m=16_kernel=softmax/rel_err" in scalars
    assert len(acc.Scalars("fidelity/softmax/rel_err")) == 2  # one step per block
    assert "attention/softmax" in acc.Tags()["images"]


def test_fidelity_from_a_trained_run(softmax_run, tmp_path, capsys):
    run_dir, _ = softmax_run
    assert main(["fidelity", "--from", str(run_dir), "--data", DATA, "--batches", "1", "--maps", "0",
                 "--variants", "softmax,atrous_linear", "--out", str(tmp_path)]) == 0
    assert "atrous_linear" in (tmp_path / "fidelity.md").read_text()


@pytest.mark.parametrize("extra,needle", [
    (["--variant", "nope"], "unknown attention variant 'nope'"),
    (["--attn", "features=8", "--variant", "performer"], "comes before any --variant"),
    (["--variant", "atrous_linear", "--attn", "window=4"], "window=4"),
    (["--from", "/nonexistent/run"], "does not exist"),
    (["--weights", "/nonexistent/w.safetensors"], "does not exist"),
])
def test_fidelity_bad_input_exits_2_with_one_line(tmp_path, capsys, extra, needle):
    assert main(["fidelity", *TINY, "--data", DATA, "--out", str(tmp_path / "o"), *extra]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_eval_at_start_reports_swap_metrics_without_changing_training(softmax_run, tmp_path):
    _, plain = softmax_run
    swapped = run_training(TrainConfig.from_dict({**TRAIN, "eval_at_start": True}), tmp_path, progress=False)
    volatile = ("time/", "throughput/", "infer/")
    for a, b in zip(plain["history"], swapped["history"]):
        same = {k: v for k, v in a.items() if not k.startswith(volatile)}
        assert same == {k: v for k, v in b.items() if not k.startswith(volatile + ("swap/",))}  # bit-identical
        assert {"swap/acc1", "swap/acc2", "swap/loss"} <= set(b)
    assert "swap/acc1" not in plain["metrics"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["metrics"]["swap/acc1"] == swapped["history"][0]["swap/acc1"]
