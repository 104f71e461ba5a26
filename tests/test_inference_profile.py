"""The inference profile (``infer/*``): measured once per run after its last epoch, in result.json,
TensorBoard (read back with TensorBoard's own loader), `vitsweep.load_results` and the report;
`vitsweep eval --profile` on saved weights. CUDA paths (the batch probe that backs off on OOM, measured
memory against the analytic model) run where a GPU exists and are skipped with a reason elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.config import TrainConfig
from finetune.inference_profile import (
    CPU_THROUGHPUT_BATCH, MEMORY_BATCHES, METRIC_KEYS, analytic_attention_training_bytes, analytic_inference_bytes,
    inference_profile, model_bytes,
)
from finetune.models import build_vit
from finetune.train import run_training
from orchestrator.cli import main

DATA = "synthetic:classes=4,size=32,n=32,n_val=16"
TRAIN = dict(model="vit_tiny_patch16_224", pretrained=False, pretrained_tag=None, img_size=32, patch_size=4, depth=2,
             data=DATA, augment="none", num_workers=0, epochs=2, batch_size=16, warmup_epochs=0.5, device="cpu",
             topk=(1, 2))
VARIANTS = [("softmax", {}), ("linformer", {"rank": 16}), ("performer", {"features": 16}), ("nystrom", {"landmarks": 8}),
            ("atrous_linear", {"dilation": [1, 2], "window": 3, "features": 16})]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(variant="softmax", hp=None, depth=2):
    return build_vit("vit_tiny_patch16_224", 4, variant=variant, attn_hparams=hp or {}, img_size=32, patch_size=4,
                     depth=depth, pretrained=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profiled_run")
    return out, run_training(TrainConfig.from_dict(TRAIN), out, progress=False)


@pytest.mark.parametrize("variant,hp", VARIANTS)
def test_cpu_profile_of_every_variant(variant, hp):
    model = tiny(variant, hp).train()
    rng = torch.get_rng_state()
    profile = inference_profile(model, (3, 32, 32), "cpu")
    assert set(profile) == set(METRIC_KEYS)
    assert profile["infer/latency_b1_ms"] > 0 and profile["infer/img_s"] > 0
    assert profile["infer/img_s_batch"] == CPU_THROUGHPUT_BATCH and profile["infer/mem_source"] == "analytic"
    mems = [profile[f"infer/peak_mem_b{b}_mb"] for b in MEMORY_BATCHES]
    assert mems[0] * 2**20 > model_bytes(model) and mems == sorted(mems) and len(set(mems)) == len(mems)
    assert model.training  # back in its mode
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched


def test_analytic_memory_is_weights_plus_a_per_image_term():
    model = tiny("softmax")
    b1, b2, b10 = (analytic_inference_bytes(model, (3, 32, 32), b) for b in (1, 2, 10))
    per_image = b2 - b1
    assert b1 - per_image == model_bytes(model) and b10 == model_bytes(model) + 10 * per_image
    # the per-image term holds at least the input, the residual stream and qkv of one block (fp32)
    N, C = 65, 192
    assert per_image >= 3 * 32 * 32 * 4 + 4 * N * C * 4
    assert analytic_inference_bytes(model, (3, 32, 32), 2, dtype_bytes=2) < b2  # bf16 activations
    assert analytic_inference_bytes(torch.nn.Linear(4, 4), (3, 32, 32), 1) is None  # no attention variant
    # the variant-dependent training figure grows with the batch and with performer's features
    small, large = (analytic_attention_training_bytes(tiny("performer", {"features": m}), 8) for m in (16, 64))
    assert 0 < small < large
    assert analytic_attention_training_bytes(tiny("softmax"), 16) == 2 * analytic_attention_training_bytes(tiny("softmax"), 8)


def test_a_run_reports_the_profile_with_its_last_epoch(run):
    out, result = run
    last, first = result["history"][-1], result["history"][0]
    assert all(key in last for key in METRIC_KEYS) and not any(k.startswith("infer/") for k in first)
    assert result["metrics"]["infer/mem_source"] == "analytic"
    assert first["memory/attn_train_analytic_mb"] > 0  # on every epoch (static)
    saved = json.loads((out / "result.json").read_text())
    assert saved["metrics"]["infer/latency_b1_ms"] == pytest.approx(last["infer/latency_b1_ms"])
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"infer/latency_b1_ms", "infer/img_s", "infer/peak_mem_b64_mb"} <= tags
    (event,) = acc.Scalars("infer/img_s")
    assert event.step == 2 and event.value == pytest.approx(last["infer/img_s"])


def test_eval_profile_on_saved_weights(run, tmp_path, capsys):
    out, _ = run
    assert main(["eval", "--weights", str(out), "--data", DATA, "--topk", "1", "2", "--max-batches", "1",
                 "--device", "cpu", "--profile", "--out", str(tmp_path / "ev")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert all(key in printed for key in METRIC_KEYS) and printed["infer/img_s_batch"] == CPU_THROUGHPUT_BATCH
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())["metrics"]
    assert saved["infer/peak_mem_b128_mb"] == pytest.approx(printed["infer/peak_mem_b128_mb"])
    assert main(["eval", "--weights", str(out), "--data", DATA, "--topk", "1", "--max-batches", "1",
                 "--device", "cpu"]) == 0
    assert not any(k.startswith("infer/") for k in json.loads(capsys.readouterr().out))  # only when asked


def test_load_results_has_the_inference_columns(tmp_path):
    from test_report import _epoch, cfg, make_experiment
    from vitsweep import load_results

    profile = {"infer/latency_b1_ms": 1.5, "infer/img_s": 900.0, "infer/img_s_batch": 32,
               **{f"infer/peak_mem_b{b}_mb": float(b) for b in MEMORY_BATCHES}, "infer/mem_source": "analytic"}
    exp = make_experiment(tmp_path, [
        ("t0", cfg("softmax", epochs=2), "TERMINATED", [_epoch(1, 0.3), {**_epoch(2, 0.5, status="finished"), **profile}],
         None, "finished"),
    ])
    frame = load_results(exp)
    assert frame.loc[0, "infer/latency_b1_ms"] == 1.5 and frame.loc[0, "infer/mem_source"] == "analytic"
    assert frame.loc[0, "infer/peak_mem_b128_mb"] == 128.0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: measured memory and the OOM back-off")


@needs_cuda
def test_cuda_profile_measures_memory_and_finds_a_batch():
    model = tiny("softmax", depth=4).cuda()
    profile = inference_profile(model, (3, 32, 32), "cuda")
    assert profile["infer/mem_source"] == "cuda"
    batch = profile["infer/img_s_batch"]
    assert batch >= 128 and batch & (batch - 1) == 0
    mems = [profile[f"infer/peak_mem_b{b}_mb"] for b in MEMORY_BATCHES]
    assert mems == sorted(mems) and mems[0] * 2**20 >= model_bytes(model)
    analytic = analytic_inference_bytes(model, (3, 32, 32), 128) / 2**20
    assert 0.5 * analytic <= mems[-1] <= 2.0 * analytic, (analytic, mems[-1])  # the model is within 2x of CUDA


@needs_cuda
def test_cuda_oom_backs_off_without_failing():
    """With the process capped to a little more than the model, the probe stops (predicted or caught OOM)
    and the profile still returns; batches that do not fit are None."""
    model = tiny("softmax", depth=4).cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = (torch.cuda.memory_allocated() + 64 * 2**20) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        profile = inference_profile(model, (3, 32, 32), "cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert profile["infer/img_s_batch"] is not None and profile["infer/img_s_batch"] < 4096


def test_every_numeric_profile_metric_is_declared_to_tensorboard_hparams():
    from finetune.tb_writer import metric_names

    numeric = [k for k in METRIC_KEYS if k != "infer/mem_source"] + ["memory/attn_train_analytic_mb"]
    assert set(numeric) <= set(metric_names())
