"""`vitsweep data cache` survives a kill: a real build in a real subprocess is killed with SIGKILL after
some shards, the same command run again continues without decoding the finished shards again, and the
cache equals one built without interruption (same bytes, same manifest but for its timestamps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from finetune.data import cache_build
from finetune.data.cache import read_manifest, verify_cache
from orchestrator.cli import main as cli_main

SHARD = 4


def _jpegs(root, n_train: int = 48, n_val: int = 8, size: int = 384) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)  # noise: a slow decode
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=92)


def _args(src, out):
    return ["data", "cache", "--data", f"imagefolder:{src}", "--out", str(out), "--size", "64",
            "--num-workers", "0", "--shard-size", str(SHARD)]


def _done_shards(work) -> int:
    try:
        state = json.loads((work / "progress.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(len(v) for v in state["done"].values())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    _jpegs(root)
    return root


def _comparable(manifest):
    return {k: v for k, v in manifest.items() if k not in ("created", "build_seconds")}


def test_a_killed_build_continues_and_equals_an_uninterrupted_one(source, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    work = cache_build.work_dir(out)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *_args(source, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while _done_shards(work) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and work.is_dir()  # nothing under DIR, the finished shards kept beside it
    done = _done_shards(work)
    total = 48 // SHARD + 8 // SHARD
    assert 2 <= done < total

    decoded = []
    original = cache_build.SquareResize.__call__
    monkeypatch.setattr(cache_build.SquareResize, "__call__", lambda self, image: decoded.append(1) or original(self, image))
    assert cli_main(_args(source, out)) == 0
    err = capsys.readouterr().err
    assert f"resuming the build in {work}: {done} of {total} shards already done" in err
    assert len(decoded) == 56 - done * SHARD  # the finished shards were not decoded again
    assert "cache train: 48/48 images (100%)" in err  # progress lines without a terminal
    assert not work.exists()
    monkeypatch.setattr(cache_build.SquareResize, "__call__", original)

    resumed = verify_cache(out)
    clean = tmp_path / "clean"
    assert cli_main(_args(source, clean)) == 0
    uninterrupted = verify_cache(clean)
    assert _comparable(resumed) == _comparable(uninterrupted)  # sha256 of every file included
    for name in ("train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())


def test_another_plan_starts_afresh(source, tmp_path, capsys):
    out = tmp_path / "cache"
    work = cache_build.work_dir(out)
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"plan": {"size": 999}, "done": {"train": [0], "val": []}}))
    (work / "train_images.npy").write_bytes(b"stale")
    assert cli_main(_args(source, out)) == 0
    assert "starting afresh" in capsys.readouterr().err
    assert read_manifest(out)["splits"]["train"]["count"] == 48


def test_shard_size_is_validated(source, tmp_path, capsys):
    assert cli_main([*_args(source, tmp_path / "c")[:-1], "0"]) == 2
    assert "shard_size=0 must be an integer in [1, 1000000]" in capsys.readouterr().err
    assert not cache_build.work_dir(tmp_path / "c").exists()
