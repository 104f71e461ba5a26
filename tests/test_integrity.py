"""Integrity everywhere it is claimed.

- The weights' checksums are checked on every load path: `load_weight_dict`, `eval` (with and without
  `--variant`, the swap into another attention), `fidelity --from` and `train --weights`.
- The sidecar must describe the weights beside it: a pair forged consistently (both digests
  recomputed) whose sidecar names another geometry or class count is refused by tensor shapes, where
  a swap would otherwise resample the position embedding or drop the head and build the wrong model.
- `load_weight_dict(expected=...)` refuses keys a sidecar does not record, by name.
- The cost cache is validated (an int >= 0 per count, its own sha256) and recounted when it is not:
  a poisoned entry never shows negative GFLOPs.

Every refusal goes through the real command line: exit 2, one `vitsweep: error:` line, no traceback,
every file hashed the same before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.errors import WeightsError
from finetune.io_utils import sha256_file
from test_hostile_input import SYNTH, TRAIN, refused, snapshot

pytestmark = pytest.mark.timeout(600)

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4", "--depth", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run: weights.safetensors + weights.json (3 classes, 32 px, depth 2, softmax)."""
    from orchestrator.cli import main

    root = tmp_path_factory.mktemp("integrity")
    assert main([*TRAIN, "--data", SYNTH, "--out", str(root / "run")]) == 0
    return root / "run"


def _copy(run_dir: Path, root: Path) -> Path:
    dest = root / "w"
    dest.mkdir()
    for name in ("weights.safetensors", "weights.json"):
        shutil.copy(run_dir / name, dest / name)
    return dest / "weights.safetensors"


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # tensor data (the header is at the front)
    path.write_bytes(bytes(data))


def _edit_sidecar(path: Path, edit) -> None:
    sidecar = path.with_suffix(".json")
    body = json.loads(sidecar.read_text())
    edit(body)
    sidecar.write_text(json.dumps(body))


def _forge(path: Path, **arch_changes) -> None:
    """Rewrite the pair as a forger would: the sidecar's arch changed, both digests recomputed."""
    from safetensors.torch import load_file, save_file

    from finetune.weights import FORMAT, _canonical, _digest

    sidecar = path.with_suffix(".json")
    body = json.loads(sidecar.read_text())
    body.pop("sha256")
    body["arch"].update(arch_changes)
    body["config"].update(arch_changes)
    header = {"format": FORMAT, "model": body["arch"]["model"], "sidecar_sha256": _digest(body),
              "arch": _canonical(body["arch"])}
    save_file(load_file(str(path)), str(path), metadata=header)
    sidecar.write_text(json.dumps({**body, "sha256": sha256_file(path)}))


def _load_paths(root: Path, weights: Path):
    """argv of every command that loads `weights`, by name."""
    data = ["--data", SYNTH, "--batch-size", "4", "--max-batches", "1", "--topk", "1"]
    return {
        "eval": ["eval", "--weights", weights, *data],
        "eval --variant": ["eval", "--weights", weights, "--variant", "linformer", "--attn", "rank=8", *data],
        "fidelity --from": ["fidelity", "--from", weights.parent, "--variants", "softmax", "--data", SYNTH,
                            "--batches", "1", "--maps", "0", "--out", root / "fid"],
        "train --weights": [*TRAIN, "--data", SYNTH, "--weights", weights, "--out", root / "out"],
    }


PATHS = ["eval", "eval --variant", "fidelity --from", "train --weights"]
TAMPER = {
    "a flipped weight byte": lambda p: _flip_a_weight_byte(p),
    "an edited metric": lambda p: _edit_sidecar(p, lambda b: b["metrics"].update({"val/acc1": 0.99})),
    "an edited class count": lambda p: _edit_sidecar(p, lambda b: b["arch"].update({"num_classes": 5})),
    "a deleted checksum": lambda p: _edit_sidecar(p, lambda b: b.pop("sha256")),
}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("tamper", list(TAMPER))
def test_every_load_path_checks_the_checksums(capsys, run_dir, tmp_path, path_name, tamper):
    weights = _copy(run_dir, tmp_path)
    TAMPER[tamper](weights)
    refused(capsys, _load_paths(tmp_path, weights)[path_name], "weights", root=tmp_path)
    with pytest.raises(WeightsError):
        from finetune.weights import load_weight_dict

        load_weight_dict(weights)


FORGED = {"img_size": 64, "num_classes": 5, "depth": 1, "patch_size": 8}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("key", list(FORGED))
def test_a_consistently_forged_sidecar_of_another_model_is_refused_by_shapes(capsys, run_dir, tmp_path, path_name, key):
    """Before, `eval --variant` resampled pos_embed or dropped the head to fit the sidecar's claim."""
    from finetune.weights import load_weight_dict

    weights = _copy(run_dir, tmp_path)
    _forge(weights, **{key: FORGED[key]})
    before = snapshot(tmp_path)
    with pytest.raises(WeightsError, match="does not describe the weights beside it"):
        load_weight_dict(weights)
    assert snapshot(tmp_path) == before
    argv = _load_paths(tmp_path, weights)[path_name]
    if path_name in ("eval", "fidelity --from") and key == "num_classes":
        argv = [a if a != SYNTH else "synthetic:classes=5,size=32,n=10,n_val=5" for a in argv]
    refused(capsys, argv, "does not describe the weights beside it", root=tmp_path)


def test_an_intact_pair_loads_on_every_path(capsys, run_dir, tmp_path):
    from orchestrator.cli import main

    weights = _copy(run_dir, tmp_path)
    for name, argv in _load_paths(tmp_path, weights).items():
        assert main([str(a) for a in argv]) == 0, name


@pytest.mark.parametrize("typo", ["modle", "variatn", "num_class", "rank", "attn", ""])
def test_expected_keys_a_sidecar_does_not_record_are_refused_by_name(run_dir, typo):
    from finetune.weights import load_weight_dict

    with pytest.raises(WeightsError, match=f"expected= has key\\(s\\) \\[{typo!r}\\]"):
        load_weight_dict(run_dir / "weights.safetensors", expected={typo: "softmax"})
    model, sidecar = load_weight_dict(run_dir / "weights.safetensors", expected={"variant": "softmax", "depth": 2})
    assert sidecar["arch"]["depth"] == 2


@pytest.mark.parametrize("command", ["eval", "eval --variant", "fidelity --from"])
@pytest.mark.parametrize("arch", ["absent", "null", "a list", "incomplete"])
def test_a_sidecar_without_arch_is_one_line(capsys, run_dir, tmp_path, command, arch):
    weights = _copy(run_dir, tmp_path)
    value = {"null": None, "a list": [1, 2], "incomplete": {"model": "vit_tiny_patch16_224"}}.get(arch)
    _edit_sidecar(weights, lambda b: b.pop("arch") if arch == "absent" else b.update({"arch": value}))
    refused(capsys, _load_paths(tmp_path, weights)[command], "has no complete 'arch' entry", root=tmp_path)


def test_vitsweep_weights_whose_sidecar_is_gone_are_refused(capsys, run_dir, tmp_path):
    weights = _copy(run_dir, tmp_path)
    weights.with_suffix(".json").unlink()
    refused(capsys, _load_paths(tmp_path, weights)["train --weights"], "sidecar", "missing", root=tmp_path)
    refused(capsys, ["eval", "--weights", weights, *MODEL, "--data", SYNTH, "--topk", "1"], "sidecar", "missing", root=tmp_path)


# ------------------------------------------------------------------------------------------ cost cache
POISON = {
    "negative flops": lambda e: e.update(flops=-10**12),
    "negative macs": lambda e: e.update(macs=-5),
    "NaN flops": "NaN",
    "float flops": lambda e: e.update(flops=1.5e9),
    "bool flops": lambda e: e.update(flops=True),
    "string flops": lambda e: e.update(flops="123"),
    "bigger flops, old digest": lambda e: e.update(flops=e["flops"] * 1000),
    "no digest": lambda e: e.pop("sha256"),
    "another key": lambda e: e.update(key="0" * 64),
    "truncated": "truncated",
    "a list": "list",
}


@pytest.mark.parametrize("poison", list(POISON))
def test_a_poisoned_cost_cache_entry_is_recounted_and_rewritten(tmp_path, monkeypatch, caplog, poison):
    from finetune import metrics
    from finetune.models import build_vit

    monkeypatch.setenv(metrics.COST_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_COUNTS", {})
    model = build_vit("vit_tiny_patch16_224", 3, img_size=32, patch_size=4, depth=1)
    truth = metrics.cost_metrics(model, (32, 32), cache=True)
    (entry,) = tmp_path.glob("*.json")
    good = json.loads(entry.read_text())
    action = POISON[poison]
    if action == "NaN":
        entry.write_text(entry.read_text().replace(f'"flops": {good["flops"]}', '"flops": NaN'))
    elif action == "truncated":
        entry.write_text(entry.read_text()[:20])
    elif action == "list":
        entry.write_text("[1, 2, 3]")
    else:
        body = dict(good)
        action(body)
        entry.write_text(json.dumps(body))
    monkeypatch.setattr(metrics, "_COUNTS", {})
    with caplog.at_level("WARNING", logger="finetune.metrics"):
        again = metrics.cost_metrics(model, (32, 32), cache=True)
    assert again["cost/gflops"] == truth["cost/gflops"] > 0
    assert again["cost/gmacs"] == truth["cost/gmacs"] > 0
    assert any(str(entry) in r.getMessage() for r in caplog.records)
    assert json.loads(entry.read_text()) == good  # rewritten with the true counts and their digest


def test_a_valid_cost_cache_entry_is_used_without_counting(tmp_path, monkeypatch):
    from finetune import metrics
    from finetune.models import build_vit

    monkeypatch.setenv(metrics.COST_CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(metrics, "_COUNTS", {})
    model = build_vit("vit_tiny_patch16_224", 3, img_size=32, patch_size=4, depth=1)
    truth = metrics.cost_metrics(model, (32, 32), cache=True)
    monkeypatch.setattr(metrics, "_COUNTS", {})

    def no_count(*args, **kwargs):
        raise AssertionError("counted although the cache holds a valid entry")

    monkeypatch.setattr(metrics, "count_flops", no_count)
    assert metrics.cost_metrics(model, (32, 32), cache=True) == truth
