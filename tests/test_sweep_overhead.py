"""What keeps a sweep near Ray's own floor (BENCHMARKS.md, sweep overhead), without Ray running:
the actor-reuse rule, FLOP/MAC counts cached by architecture, the final report sent after the run's
outputs, and no full garbage collection after a CPU trial."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY_SWEEP_FIXED

from finetune import metrics
from finetune.errors import ConfigError
from finetune.metrics import architecture_key, cost_metrics
from finetune.models import build_vit
from search_spaces import SweepSpec


# ------------------------------------------------------------------------------------- actor reuse
@pytest.mark.parametrize("reuse, gpu, expected", [
    (None, 0, True), (None, 1, False), (None, 0.5, False),
    (True, 0, True), (True, 1, True), (False, 0, False), (False, 1, False),
])
def test_actor_reuse_defaults_to_cpu_only_trials_and_an_explicit_value_wins(reuse, gpu, expected):
    values = {"fixed": dict(TINY_SWEEP_FIXED), "resources": {"cpu": 1, "gpu": gpu}}
    if reuse is not None:
        values["reuse_actors"] = reuse
    spec = SweepSpec.from_dict(values)
    assert spec.actor_reuse is expected
    again = SweepSpec.from_dict(spec.to_dict())  # the marker keeps the setting (null stays automatic)
    assert again.reuse_actors == reuse and again.actor_reuse is expected


def test_reuse_actors_refuses_anything_but_true_false_or_null():
    with pytest.raises(ConfigError, match="reuse_actors='yes'"):
        SweepSpec.from_dict({"fixed": dict(TINY_SWEEP_FIXED), "reuse_actors": "yes"})


@pytest.mark.parametrize("reuse, expected", [(None, True), (False, False)])
def test_the_tuner_gets_the_resolved_rule(reuse, expected, tmp_path):
    from orchestrator.storage import resolve_storage
    from orchestrator.sweep import build_tuner
    from search_spaces import load_sweep

    resolved = load_sweep({"fixed": {**TINY_SWEEP_FIXED, "epochs": 1}, "reuse_actors": reuse}, check_geometry=False)
    tuner = build_tuner(resolved, resolve_storage(str(tmp_path)), "x")
    assert tuner._local_tuner._tune_config.reuse_actors is expected


# ---------------------------------------------------------------------------------- cost cache
@pytest.fixture()
def cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.COST_CACHE_ENV, str(tmp_path / "cost"))
    monkeypatch.setattr(metrics, "_COUNTS", {})
    return tmp_path / "cost"


def _tiny(**kwargs):
    return build_vit("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=kwargs.pop("depth", 2), **kwargs)


def test_counts_are_cached_per_architecture_in_process_and_on_disk(cost_cache, monkeypatch):
    model = _tiny()
    first = cost_metrics(model, (32, 32), cache=True)
    files = list(cost_cache.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["flops"] > 0

    def no_count(*args, **kwargs):
        raise AssertionError("counted again")

    monkeypatch.setattr(metrics, "count_flops", no_count)
    monkeypatch.setattr(metrics, "count_macs_fvcore", no_count)
    # Same architecture, other weights (another seed): the process's cache, then the disk's.
    assert cost_metrics(_tiny(), (32, 32), cache=True) == first
    monkeypatch.setattr(metrics, "_COUNTS", {})  # a new worker process
    assert cost_metrics(_tiny(), (32, 32), cache=True) == first
    # Another architecture is counted: a different depth, variant or input size is a different key.
    key = architecture_key(model, (32, 32))
    assert architecture_key(_tiny(depth=3), (32, 32)) != key
    assert architecture_key(_tiny(variant="linformer", attn_hparams={"rank": 8}), (32, 32)) != key
    assert architecture_key(_tiny(variant="linformer", attn_hparams={"rank": 16}), (32, 32)) != \
        architecture_key(_tiny(variant="linformer", attn_hparams={"rank": 8}), (32, 32))
    assert architecture_key(model, (64, 64)) != key
    with pytest.raises(AssertionError, match="counted again"):
        cost_metrics(_tiny(depth=3), (32, 32), cache=True)


def test_a_corrupt_cache_file_is_counted_again_and_uncached_calls_never_touch_the_disk(cost_cache):
    model = _tiny()
    expected = cost_metrics(model, (32, 32))
    assert not cost_cache.exists()  # cache=False (the default): nothing written
    cost_cache.mkdir()
    key = architecture_key(model, (32, 32))
    (cost_cache / f"{key}.json").write_text('{"format": "vitsweep-cost-counts-v1", "key": "' + key + '", "flops": "x"}')
    assert cost_metrics(model, (32, 32), cache=True) == expected
    assert json.loads((cost_cache / f"{key}.json").read_text())["flops"] == pytest.approx(expected["cost/gflops"] * 1e9)


def test_the_disk_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.COST_CACHE_ENV, "off")
    monkeypatch.setattr(metrics, "_COUNTS", {})
    assert metrics.cost_cache_dir() is None
    cost_metrics(_tiny(), (32, 32), cache=True)
    assert len(metrics._COUNTS) == 1


# ------------------------------------------------------------------------------ end of a trial
def test_a_cpu_run_skips_the_full_garbage_collection(monkeypatch):
    import gc

    import torch

    from finetune.train import release_device_memory

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA in use in this process")
    monkeypatch.setattr(gc, "collect", lambda *a: (_ for _ in ()).throw(AssertionError("collected")))
    release_device_memory()


def test_the_final_epoch_is_reported_after_the_outputs(monkeypatch, tmp_path):
    """The reporter holds the last epoch back; `report_final` sends it with its checkpoint, `discard`
    drops a held-back checkpoint when the run failed after its last epoch."""
    from ray import tune

    from trainables import finetune_trainable as ft

    sent = []

    def fake_report(metrics, checkpoint=None):
        files = sorted(os.listdir(checkpoint.path)) if checkpoint is not None else None
        sent.append((metrics["status"], files))

    def fake_save(state, directory):
        with open(os.path.join(directory, "meta.json"), "w") as fh:
            json.dump({"epoch": state}, fh)

    monkeypatch.setattr(tune, "report", fake_report)
    monkeypatch.setattr(ft, "save_checkpoint", fake_save)
    reporter = ft.TuneReportCallback("softmax", [{"node_id": "n", "node_ip": "127.0.0.1"}], defer_final=True)
    reporter.on_epoch_end(1, {"status": "running", "val/acc1": 0.5})
    assert sent == [("running", ["meta.json", "nodes.json"])]
    reporter.on_epoch_end(2, {"status": "finished", "val/acc1": 0.6})
    assert len(sent) == 1 and reporter.reports == 2
    held = reporter.pending["checkpoint"]
    assert os.path.isdir(held)
    assert reporter.report_final() is True
    assert sent[-1] == ("finished", ["meta.json", "nodes.json"]) and not os.path.exists(held)
    assert reporter.report_final() is False

    reporter = ft.TuneReportCallback("softmax", [], defer_final=True)
    reporter.on_epoch_end(1, {"status": "finished", "val/acc1": float("nan")})
    held = reporter.pending["checkpoint"]
    reporter.discard()
    assert reporter.pending is None and not os.path.exists(held) and len(sent) == 2

    reporter = ft.TuneReportCallback("softmax", [], defer_final=True)
    reporter.on_epoch_end(1, {"status": "diverged", "train/loss": float("nan")})
    assert reporter.report_final() is True and sent[-1] == ("diverged", None)

    reporter = ft.TuneReportCallback("softmax", [])  # not deferred: reported at once, as before
    reporter.on_epoch_end(1, {"status": "finished"})
    assert sent[-1] == ("finished", ["meta.json", "nodes.json"]) and reporter.pending is None
