"""`vitsweep` as a user runs it: help, a real training run and its outputs, and bad input."""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from orchestrator.cli import main

TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--patch-size", "4", "--depth", "2",
        "--num-workers", "0", "--augment", "none", "--no-progress"]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "run", "resume", "report", "data", "bench"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--variant", "--rank", "--features", "--landmarks", "--dilation", "--window", "--data", "--epochs",
                 "--batch-size", "--lr", "--weight-decay", "--warmup-epochs", "--seed", "--device", "--precision",
                 "--topk", "--augment", "--scale", "--hflip", "--color-jitter", "--weights", "--pretrained"):
        assert flag in out, flag


def _tb_tags(logdir):
    tags = {"scalars": set(), "images": set(), "hparams": set()}
    for root, _, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"images": 0, "scalars": 0})
            acc.Reload()
            tags["scalars"] |= set(acc.Tags()["scalars"])
            tags["images"] |= set(acc.Tags()["images"])
            tags["hparams"] |= set(acc.PluginTagToContent("hparams"))
    return tags


def test_train_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--data", "synthetic:classes=4,size=32,n=64,n_val=32", "--epochs", "2",
                 "--batch-size", "16", "--warmup-epochs", "0.5", "--topk", "1", "2", "--out", str(out), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "finished"
    for name in ("result.json", "weights.safetensors", "weights.json", "preprocessing.json", "checkpoint/meta.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["variant"] == "softmax" and len(result["history"]) == 2
    assert {"val/acc1", "val/acc2", "train/loss", "cost/gflops"} <= set(result["metrics"])
    pre = json.loads((out / "preprocessing.json").read_text())
    assert pre["input_size"] == [3, 32, 32] and pre["eval_steps"]
    tags = _tb_tags(out / "tb")
    assert {"train/loss", "val/loss", "val/acc1", "val/acc2", "lr", "throughput/train_img_s"} <= tags["scalars"]
    assert "samples/val" in tags["images"]
    assert "_hparams_/session_start_info" in tags["hparams"]

    # --resume on a finished run trains nothing more and reports the same metrics
    assert main(["train", *TINY, "--data", "synthetic:classes=4,size=32,n=64,n_val=32", "--epochs", "2",
                 "--batch-size", "16", "--warmup-epochs", "0.5", "--topk", "1", "2", "--out", str(out), "--resume", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["val/acc1"] == printed["val/acc1"]


BAD = [
    (["--variant", "softmx"], "unknown attention variant 'softmx' (did you mean 'softmax'?)"),
    (["--model", "vit_nope_patch16_224"], "model='vit_nope_patch16_224' is not a timm model"),
    (["--img-size", "30"], "img_size=30 is not divisible by patch_size=4"),
    (["--epochs", "0"], "epochs=0 must be a positive integer"),
    (["--batch-size", "-1"], "batch_size=-1 must be a positive integer"),
    (["--lr", "0"], "lr=0.0 must be a positive number"),
    (["--data", "imagefolder:/nonexistent/dir"], "/nonexistent/dir"),
    (["--data", "synthetc"], "unknown data kind 'synthetc'"),
    (["--topk", "1", "7"], "k=7 is larger than the 4 classes"),
    (["--precision", "fp16", "--device", "cpu"], "precision='fp16' needs a CUDA device"),
    (["--weights", "/nonexistent/w.safetensors", "--no-pretrained"], "weights='/nonexistent/w.safetensors' does not exist"),
    (["--config", "/nonexistent/c.yaml"], "config file '/nonexistent/c.yaml' does not exist"),
]


@pytest.mark.parametrize("extra, fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_exits_2_names_the_value_and_writes_nothing(tmp_path, capsys, extra, fragment):
    out = tmp_path / "never"
    args = ["train", *TINY, "--data", "synthetic:classes=4,size=32,n=16,n_val=8", "--epochs", "1", "--out", str(out)]
    if extra[0] == "--data":
        args[args.index("--data") + 1] = extra[1]
        extra = []
    assert _exit_code(args + extra) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def _exit_code(argv):
    """main()'s return code, or argparse's SystemExit code for rejected choices."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "vitsweep" in proc.stdout
