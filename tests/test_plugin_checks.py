"""No false success from plug-ins and data, no traceback from a plug-in's own code.

A plug-in attention (``--variant module:Class``) is checked before any training, by `train` and by
the sweep driver's validation (`run`, before Ray starts): its import (errors and ``sys.exit``), its
construction (``check_geometry``) and a dry forward of ``attend`` on a small random batch in eval and
train mode (shape (B, H, N, D), the input's dtype, finite values). Each failure is one line naming the
variant and class, exit 2, no traceback, nothing written. Plug-ins are generated per failure.

A plug-in that passes the dry run but gives NaN in evaluation ends ``diverged`` with its accuracy
zeroed and its loss null, never ``finished`` with the argmax of NaN logits as an accuracy.

Data: a split needs images of at least two classes (one empty class folder of two is refused), and a
saved `hf:` folder with missing splits or files is one line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from test_hostile_input import SWEEP_FIXED, TRAIN, _image_folder, _yaml_file, refused, scratch, sweep, train

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
HEADER = "import sys, torch\nfrom finetune.models.attention import AttentionBase\n"
SOFTMAX = "(q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v"  # (B, H, N, D)

# name: (module body, fragment of the one error line)
IMPORT_FAILURES = {
    "sys.exit(0)": ("sys.exit(0)", "called sys.exit(0)"),
    "sys.exit(3)": ("sys.exit(3)", "called sys.exit(3)"),
    "sys.exit('bye')": ("sys.exit('bye')", "called sys.exit('bye')"),
    "RuntimeError": ("raise RuntimeError('boom at import')", "raised RuntimeError: boom at import"),
    "KeyError": ("{}['missing']", "raised KeyError: 'missing'"),
    "ZeroDivisionError": ("1 / 0", "raised ZeroDivisionError"),
    "a missing dependency": ("import no_such_dependency_zz", "cannot be imported (ModuleNotFoundError"),
    "SyntaxError": ("def broken(:\n    pass", "cannot be imported (SyntaxError"),
}


def _attend(body: str) -> str:
    return f"class Plug(AttentionBase):\n    def attend(self, q, k, v):\n        {body}\n"


ATTEND_FAILURES = {
    "(B, N, H, D)": (_attend(f"return ({SOFTMAX}).transpose(1, 2)"), "returned shape [2, 65, 3, 64]"),
    "float64": (_attend(f"return ({SOFTMAX}).double()"), "returned torch.float64 for torch.float32 inputs"),
    "float16": (_attend(f"return ({SOFTMAX}).half()"), "returned torch.float16 for torch.float32 inputs"),
    "NaN": (_attend(f"return ({SOFTMAX}) * float('nan')"), "returned non-finite values"),
    "inf": (_attend(f"return ({SOFTMAX}) + float('inf')"), "returned non-finite values"),
    "NaN in eval only": (_attend(f"return ({SOFTMAX}) * (1.0 if self.training else float('nan'))"),
                         "returned non-finite values (NaN or inf) on a dry run (eval mode)"),
    "NaN in train only": (_attend(f"return ({SOFTMAX}) * (float('nan') if self.training else 1.0)"),
                          "(train mode)"),
    "one token short": (_attend(f"return ({SOFTMAX})[:, :, 1:]"), "returned shape [2, 3, 64, 64]"),
    "a tuple": (_attend(f"return ({SOFTMAX}), None"), "returned tuple, not a tensor"),
    "raises": (_attend("raise ValueError('attend exploded')"), "attend(q, k, v) raised ValueError"),
    "an index error": (_attend("return v[:, :, 10**6]"), "attend(q, k, v) raised IndexError"),
    "check_geometry raises": (
        "class Plug(AttentionBase):\n    def check_geometry(self):\n        raise KeyError('geometry exploded')\n"
        f"    def attend(self, q, k, v):\n        return {SOFTMAX}\n",
        "raised KeyError while being built (check_geometry or __init__): 'geometry exploded'"),
    "check_geometry divides by zero": (
        "class Plug(AttentionBase):\n    def check_geometry(self):\n        1 / 0\n"
        f"    def attend(self, q, k, v):\n        return {SOFTMAX}\n",
        "raised ZeroDivisionError while being built"),
}


def _plugin(directory: Path, body: str) -> str:
    """A module with a unique name (imports are cached in-process) holding `body`; returns its name."""
    name = f"plug_{uuid.uuid4().hex[:10]}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(HEADER + body + "\n")
    return name


@pytest.mark.parametrize("case", list(IMPORT_FAILURES))
def test_a_plugin_that_fails_at_import_is_one_line(capsys, monkeypatch, tmp_path, case):
    body, fragment = IMPORT_FAILURES[case]
    module = _plugin(tmp_path / "plugins", body)  # outside the hashed root: importing writes __pycache__
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    with scratch() as root:
        refused(capsys, train(root, "--variant", f"{module}:Plug"), f"'{module}:Plug'", fragment, root=root)


@pytest.mark.parametrize("case", list(ATTEND_FAILURES))
def test_a_plugin_whose_attend_or_geometry_is_wrong_is_refused_before_training(capsys, monkeypatch, tmp_path, case):
    body, fragment = ATTEND_FAILURES[case]
    module = _plugin(tmp_path / "plugins", body)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    with scratch() as root:
        refused(capsys, train(root, "--variant", f"{module}:Plug"), f"'{module}:Plug' (Plug)", fragment, root=root)


@pytest.mark.parametrize("case", ["sys.exit(0)", "(B, N, H, D)", "float64", "raises"])
def test_the_sweep_driver_refuses_a_bad_plugin_before_ray_starts(capsys, monkeypatch, tmp_path, case):
    body, fragment = {**IMPORT_FAILURES, **ATTEND_FAILURES}[case]
    module = _plugin(tmp_path / "plugins", body)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    with scratch() as root:
        config = _yaml_file(root, {"name": "plug", "fixed": SWEEP_FIXED, "variants": [{"variant": f"{module}:Plug"}]})
        refused(capsys, sweep(root, config), f"{module}:Plug", fragment, root=root)


@pytest.mark.parametrize("case", ["(B, N, H, D)", "raises", "check_geometry raises"])
def test_eval_with_a_bad_plugin_variant_is_one_line(capsys, monkeypatch, tmp_path, case):
    body, fragment = ATTEND_FAILURES[case]
    module = _plugin(tmp_path / "plugins", body)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    with scratch() as root:
        argv = ["eval", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4", "--depth", "2",
                "--variant", f"{module}:Plug", "--data", "synthetic:classes=3,size=32,n=8,n_val=4", "--topk", "1"]
        refused(capsys, argv, f"{module}:Plug", fragment, root=root)


@pytest.mark.parametrize("command", ["train", "run"])
def test_sys_exit_0_at_import_exits_2_in_a_real_process(tmp_path, command):
    """The case that used to exit 0 having done nothing, as a user runs it."""
    module = _plugin(tmp_path / "plugins", "sys.exit(0)")
    env = {"PYTHONPATH": f"{REPO}:{tmp_path / 'plugins'}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if command == "train":
        argv = [*train(tmp_path, "--variant", f"{module}:Plug")]
    else:
        config = _yaml_file(tmp_path, {"name": "plug", "fixed": SWEEP_FIXED, "variants": [{"variant": f"{module}:Plug"}]})
        argv = sweep(tmp_path, config)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("called sys.exit(0)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "storage").exists()


NAN_IN_EVAL_AFTER_THE_DRY_RUN = _attend(
    f"out = {SOFTMAX}\n        return out * float('nan') if (not self.training and q.shape[0] > 2) else out")


def test_nan_outputs_in_evaluation_only_end_diverged_not_finished(tmp_path, monkeypatch):
    """Passes the dry run (batch of 2), NaN on the real evaluation batches: before, status finished with
    val acc@1 = the share of class 0 (argmax of NaN logits)."""
    from orchestrator.cli import main

    module = _plugin(tmp_path / "plugins", NAN_IN_EVAL_AFTER_THE_DRY_RUN)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    assert main([str(a) for a in train(tmp_path, "--variant", f"{module}:Plug")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "diverged"
    assert result["metrics"]["status"] == "diverged"
    assert result["metrics"]["val/loss"] is None
    assert result["metrics"]["val/acc1"] == 0.0
    assert len(result["history"]) == 1  # stopped at the first diverged epoch


def test_evaluate_reports_null_metrics_for_non_finite_logits():
    import torch

    from finetune.loop import evaluate

    class NanHead(torch.nn.Module):
        def forward(self, x):  # (B, 3, H, W) -> (B, 4): NaN logits
            return torch.full((x.shape[0], 4), float("nan"))

    loader = [(torch.zeros(4, 3, 2, 2), torch.tensor([0, 0, 1, 2]))]
    out = evaluate(NanHead(), loader, torch.device("cpu"), (1,))
    assert out["val/loss"] != out["val/loss"] and out["val/acc1"] != out["val/acc1"]  # NaN: null in outputs


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("empty_in", ["train", "val", "both"])
def test_two_class_folders_one_of_them_empty_is_refused(capsys, empty_in):
    with scratch() as root:
        imgs = _image_folder(root, ["cat", "dog"], per_class=2)
        for split in (["train", "val"] if empty_in == "both" else [empty_in]):
            shutil.rmtree(imgs / split / "dog")
            (imgs / split / "dog").mkdir()
        refused(capsys, train(root, data=f"imagefolder:{imgs}"), "images of 1 class(es) only",
                "at least 2 classes with images", "(without images: [dog])", root=root)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    import datasets
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("hf") / "ds"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(4)]
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(root))
    return root


HF_DAMAGE = {
    "the validation split folder is gone": (lambda r: shutil.rmtree(r / "validation"), "lacks state.json, dataset_info.json"),
    "train/state.json is gone": (lambda r: (r / "train" / "state.json").unlink(), "lacks state.json"),
    "train's data files are gone": (lambda r: [p.unlink() for p in (r / "train").glob("*.arrow")],
                                    "cannot load the saved dataset"),
    "dataset_dict.json is not JSON": (lambda r: (r / "dataset_dict.json").write_text("{nope"),
                                      "is not a readable dataset_dict.json"),
    "splits is not a list of names": (lambda r: (r / "dataset_dict.json").write_text('{"splits": 3}'),
                                      "must list its splits as names"),
    "no validation split listed": (lambda r: (r / "dataset_dict.json").write_text('{"splits": ["train"]}'),
                                   "it needs 'train' and one of"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_a_damaged_saved_hf_folder_is_one_line(capsys, saved_dataset, damage):
    action, fragment = HF_DAMAGE[damage]
    with scratch() as root:
        target = root / "ds"
        shutil.copytree(saved_dataset, target)
        action(target)
        refused(capsys, train(root, data=f"hf:{target}"), fragment, root=root)


def test_a_saved_hf_folder_with_one_labelled_class_is_refused(capsys, saved_dataset, tmp_path):
    import datasets

    dd = datasets.load_from_disk(str(saved_dataset))
    one = dd.map(lambda row: {"label": 0})
    one.save_to_disk(str(tmp_path / "one"))
    refused(capsys, train(tmp_path, data=f"hf:{tmp_path / 'one'}"), "images of 1 class(es) only", root=tmp_path)
