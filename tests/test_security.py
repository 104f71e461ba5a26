"""Security: nothing remote is trusted or reached unless asked, services bind to loopback.

Tested elsewhere, not repeated here: a malicious pickle passed as weights is refused without being run
(test_models.py::test_malicious_pickle_is_not_executed, and through the CLI in test_bad_input.py);
checkpoint state is read with weights_only=True (test_loop.py::test_corrupt_checkpoint_is_refused);
`vitsweep resume` refuses a directory that is not a vitsweep experiment
(test_orchestrator_cli.py::test_resume_refuses_a_directory_that_is_not_a_vitsweep_experiment and the
"experiment:" rows of test_bad_input.py).
"""

import re
import socket
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("finetune", "trainables", "search_spaces", "orchestrator", "benchmarks")


def _product_files():
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*")):
            if path.suffix in (".py", ".yaml", ".yml", ".toml", ".cfg") and "__pycache__" not in path.parts:
                yield path


def test_product_code_never_trusts_remote_code_or_unpickles():
    files = list(_product_files())
    assert len(files) > 30, "the product packages were not found"
    offenders = []
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        if "trust_remote_code" in text:
            offenders.append(f"{rel}: trust_remote_code")
        if re.search(r"weights_only\s*=\s*False", text) or re.search(r"allow_pickle\s*=\s*True", text):
            offenders.append(f"{rel}: unpickling enabled")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start():text.find("\n", match.start())]  # every call here fits one line
            if "weights_only=True" not in call:
                offenders.append(f"{rel}: {call}")
        if re.search(r"\bpickle\.loads?\(", text):
            offenders.append(f"{rel}: pickle.load")
        if "0.0.0.0" in text:
            offenders.append(f"{rel}: binds to every interface")
        if re.search(r"RAY_AUTH_MODE\W+disabled", text):
            offenders.append(f"{rel}: turns Ray token auth off")
    assert not offenders, offenders


class HubReached(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """The hub clients and every socket connection fail loudly, naming what tried."""
    import datasets
    import huggingface_hub

    def refuse(what):
        def fail(*args, **kwargs):
            raise HubReached(f"{what} was called: {args} {kwargs}")

        return fail

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("huggingface_hub.hf_hub_download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse("huggingface_hub.snapshot_download"))
    monkeypatch.setattr(datasets, "load_dataset", refuse("datasets.load_dataset"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))


TRAIN = ["train", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4", "--depth", "2",
         "--num-workers", "0", "--augment", "none", "--no-progress", "--epochs", "1", "--topk", "1",
         "--batch-size", "8", "--max-train-batches", "1", "--max-val-batches", "1"]


def test_local_runs_never_reach_the_hub_or_the_network(no_network, tmp_path, capsys):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    # synthetic data, no pretrained weights
    assert main([*TRAIN, "--no-pretrained", "--data", "synthetic:classes=4,size=32,n=16,n_val=8",
                 "--out", str(tmp_path / "a")]) == 0
    # a local image folder and local weights
    for split in ("train", "val"):
        for i, cls in enumerate(("cat", "dog")):
            for j in range(4):
                (tmp_path / "imgs" / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (60 * i, 20 * j, 0)).save(tmp_path / "imgs" / split / cls / f"{j}.png")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "local.safetensors"))
    assert main([*TRAIN, "--no-pretrained", "--weights", str(tmp_path / "local.safetensors"), "--data", f"imagefolder:{tmp_path / 'imgs'}",
                 "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "result.json").is_file() and (tmp_path / "b" / "result.json").is_file()


def test_the_hub_is_reached_when_asked(no_network, tmp_path, monkeypatch, capsys):
    """The guard above is real: asking for hub weights or hub data does go to the (refused) hub."""
    from finetune.models import build_vit

    with pytest.raises(HubReached, match="hf_hub_download"):
        build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=4, depth=2, pretrained=True,
                  pretrained_tag="augreg_in21k")
    from finetune.data.sources import load_dataset_dict

    with pytest.raises(HubReached, match="load_dataset"):
        load_dataset_dict("someone/some-dataset")


def test_local_ray_binds_its_dashboard_to_loopback(monkeypatch):
    import ray

    from orchestrator import sweep

    calls = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))

    monkeypatch.setattr(sweep, "dashboard_available", lambda: True)
    sweep.init_ray(None, 2, 0)
    assert calls[-1]["include_dashboard"] is True and calls[-1]["dashboard_host"] == "127.0.0.1"
    assert calls[-1]["address"] == "local"

    monkeypatch.setattr(sweep, "dashboard_available", lambda: False)
    sweep.init_ray(None, 2, 0)
    assert calls[-1]["include_dashboard"] is False and calls[-1].get("dashboard_host", "127.0.0.1") == "127.0.0.1"
    assert calls[-1]["_node_ip_address"] == "127.0.0.1"  # every local server on loopback

    # joining a cluster starts no service here: its dashboard is the cluster's (README: SSH tunnel)
    sweep.init_ray("ray://head:10001", None, None)
    assert calls[-1] == {"address": "ray://head:10001", "log_to_driver": True}
