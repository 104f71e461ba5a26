"""No hang on special files: a FIFO, a socket or a device where vitsweep expects a regular file (an
image, a cache file, weights, a sidecar, a cost-cache entry) is refused by name, or (the cost cache,
which is vitsweep's own) ignored with a warning and counted again. Nothing here may block: a FIFO
named ``x.png`` blocked ``open()`` forever before. Every test runs under a pytest timeout, and the
refusals go through the real command line (exit 2, one line, no traceback, no file changed).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from finetune.errors import DataError, WeightsError
from finetune.safe_files import check_regular, open_regular
from test_hostile_input import _image_folder, refused, scratch, snapshot, train

pytestmark = pytest.mark.timeout(300)


def _make_special(path: Path, kind: str) -> None:
    """A FIFO, a listening-less UNIX socket file, or a link to a character device at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()  # the socket file stays
    elif kind == "chardev":
        path.symlink_to("/dev/zero")  # reads never end
    else:
        raise ValueError(kind)


KINDS = ["fifo", "socket", "chardev"]


def test_open_regular_never_blocks_on_a_fifo_and_names_what_it_found(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"x\.png' is a FIFO \(named pipe\), not a regular file"):
        open_regular(fifo, "image", DataError)
    with pytest.raises(DataError, match="is a character device"):
        check_regular("/dev/null", "image", DataError)
    regular = tmp_path / "ok.txt"
    regular.write_text("fine")
    with open_regular(regular, "file", DataError, mode="r") as fh:
        assert fh.read() == "fine"


@pytest.mark.parametrize("skip_bad", [False, True], ids=["plain", "skip-bad-images"])
@pytest.mark.parametrize("where", ["train/cat/x.png", "val/dog/x.png", "train/dog/sub/x.jpg"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_special_file_in_an_image_folder_is_refused_by_name(capsys, kind, where, skip_bad):
    with scratch() as root:
        imgs = _image_folder(root, ["cat", "dog"], per_class=2)
        _make_special(imgs / where, kind)
        flags = ["--skip-bad-images"] if skip_bad else []
        line = refused(capsys, train(root, *flags, data=f"imagefolder:{imgs}"), str(imgs / where),
                       "not a regular file", root=root)
        assert {"fifo": "FIFO", "socket": "socket", "chardev": "character device"}[kind] in line


def test_a_fifo_that_appears_after_the_scan_fails_without_blocking(tmp_path):
    """The race between the scan and the read: the loader opens with O_NONBLOCK and checks fstat."""
    from finetune.data.images import is_decodable, load_rgb

    fifo = tmp_path / "late.png"
    os.mkfifo(fifo)
    assert is_decodable(str(fifo)) is False
    with pytest.raises(DataError, match="late.png' is a FIFO"):
        load_rgb(str(fifo))


@pytest.mark.parametrize("kind", KINDS)
def test_a_special_file_as_weights_or_sidecar_is_refused(capsys, kind):
    with scratch() as root:
        weights = root / "w.safetensors"
        _make_special(weights, kind)
        refused(capsys, train(root, "--weights", weights), str(weights), "not a regular file", root=root)
        refused(capsys, ["eval", "--weights", weights, "--model", "vit_tiny_patch16_224", "--img-size", "32",
                         "--patch-size", "4", "--depth", "2", "--data", "synthetic:classes=3,size=32,n=8,n_val=4"],
                str(weights), "not a regular file", root=root)


def test_a_fifo_sidecar_is_refused_by_load_weight_dict(tmp_path):
    from safetensors.torch import save_file
    import torch

    from finetune.weights import load_weight_dict

    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    os.mkfifo(tmp_path / "w.json")
    with pytest.raises(WeightsError, match=r"w\.json' is a FIFO"):
        load_weight_dict(tmp_path / "w.safetensors")


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    from orchestrator.cli import main

    root = tmp_path_factory.mktemp("cache")
    code = main(["data", "cache", "--data", "synthetic:classes=3,size=16,n=6,n_val=3", "--size", "16",
                 "--out", str(root / "c")])
    assert code == 0
    return root / "c"


@pytest.mark.parametrize("member", ["train_images.npy", "val_labels.npy", "manifest.json"])
def test_a_fifo_in_a_decode_once_cache_is_refused(capsys, small_cache, member, tmp_path):
    import shutil

    cache = tmp_path / "c"
    shutil.copytree(small_cache, cache)
    (cache / member).unlink()
    os.mkfifo(cache / member)
    argv = [*train(tmp_path, data=f"cache:{cache}")]
    line = refused(capsys, argv, member, root=tmp_path)
    assert "missing" in line or "not a regular file" in line or "no manifest.json" in line


def test_a_fifo_under_the_cost_cache_key_is_counted_again_and_replaced(capsys, tmp_path, monkeypatch, caplog):
    """A FIFO at the cost cache's entry for the run's architecture: `train` neither blocks nor fails;
    the entry is ignored with a warning naming it, counted again, and replaced by a valid file."""
    from finetune import metrics
    from orchestrator.cli import main

    cache_dir = tmp_path / "cost"
    monkeypatch.setenv(metrics.COST_CACHE_ENV, str(cache_dir))
    monkeypatch.setattr(metrics, "_COUNTS", {})
    assert main([str(a) for a in train(tmp_path / "first")]) == 0
    (entry,) = cache_dir.glob("*.json")
    first = json.loads(entry.read_text())
    entry.unlink()
    os.mkfifo(entry)
    monkeypatch.setattr(metrics, "_COUNTS", {})  # a fresh process's view: only the disk cache
    with caplog.at_level("WARNING", logger="finetune.metrics"):
        assert main([str(a) for a in train(tmp_path / "second")]) == 0
    assert any(str(entry) in r.getMessage() and "FIFO" in r.getMessage() for r in caplog.records)
    assert stat.S_ISREG(os.stat(entry).st_mode)
    assert json.loads(entry.read_text()) == first
    result = json.loads((tmp_path / "second" / "out" / "result.json").read_text())
    assert result["metrics"]["cost/gflops"] == first["flops"] / 1e9


def test_snapshot_of_a_tree_with_a_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    assert snapshot(tmp_path) == {"pipe": "dir"}
