"""GPU figures that are checkable without a GPU: the datasheet peak table, the NVML peak sampler (fed a
sequence of readings), the process/device fallback, the decorators, and the TF32 flag's path to
result.json. NVML on a real GPU runs in `vitsweep bench gpu`."""

import json
import threading

import pytest
import torch

import vitsweep
from finetune.gpu_stats import GPU_PEAKS, NvmlReading, PeakSampler, gpu_model, matmul_precision, nvml_peak, peak_tflops
from finetune.metrics import count_flops as count_model_flops
from finetune.metrics import mfu_metrics
from finetune.profiling import Counted, FlopStats, MemoryStats, Tracked
from orchestrator.cli import main

NAMES = {  # the names torch.cuda.get_device_name reports -> (model, dense bf16 TFLOP/s)
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 989.4),
    "NVIDIA H100 PCIe": ("H100 PCIe", 756.5),
    "NVIDIA H100 NVL": ("H100 NVL", 835.5),
    "NVIDIA H200": ("H200 SXM", 989.4),
    "NVIDIA H200 NVL": ("H200 NVL", 835.5),
    "NVIDIA GH200 480GB": ("GH200", 989.4),
    "NVIDIA A100-SXM4-80GB": ("A100 80GB", 312.0),
    "NVIDIA A100-PCIE-40GB": ("A100 40GB", 312.0),
    "NVIDIA L40S": ("L40S", 362.05),
    "NVIDIA L40": ("L40", 181.05),
    "NVIDIA L4": ("L4", 121.0),
    "NVIDIA A10": ("A10", 125.0),
    "Tesla V100-SXM2-16GB": ("V100 SXM2", None),  # no bf16 tensor cores
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 165.2),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_peak_table_finds_each_gpu_model_by_its_cuda_name(name):
    model, bf16 = NAMES[name]
    assert gpu_model(name) == model
    assert peak_tflops(name, "bf16") == bf16


def test_unknown_gpus_and_lookalikes_get_no_peak():
    for name in ("NVIDIA A10G", "NVIDIA B200", "AMD Instinct MI300X", "cpu", ""):
        assert gpu_model(name) is None and peak_tflops(name, "bf16") is None, name
    assert peak_tflops("Tesla V100-PCIE-32GB", "fp16") == 112.0
    assert peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0
    with pytest.raises(ValueError, match="allowed: bf16, fp16, tf32, fp32"):
        peak_tflops("NVIDIA H100 PCIe", "int8")
    # every entry is a dense figure: bf16 is at most 2x tf32 and tf32 at least fp32 (no 2:4 sparse figure slipped in)
    for _, label, peaks in GPU_PEAKS:
        if "tf32" in peaks:
            assert peaks["bf16"] <= 2.1 * peaks["tf32"] and peaks["tf32"] >= peaks["fp32"], label


def test_matmul_precision_and_mfu_on_a_cpu():
    assert matmul_precision("fp32", True) == "tf32" and matmul_precision("fp32", False) == "fp32"
    assert matmul_precision("bf16", True) == "bf16"
    assert mfu_metrics(torch.device("cpu"), "bf16", 4.6, 1000.0) == {}  # no MFU column on a CPU


def test_sampler_keeps_the_peak_of_a_sequence_of_readings():
    readings = [NvmlReading(100.0, 900.0), NvmlReading(350.0, 1200.0), NvmlReading(200.0, 1000.0)]
    done = threading.Event()

    def read():
        if len(readings) == 1:
            done.set()
            return readings[0]  # the last value repeats until stop
        return readings.pop(0)

    sampler = PeakSampler(read, interval_s=0.001).start()
    assert done.wait(10)
    sampler.stop()
    assert sampler.process_peak_mb == 350.0 and sampler.device_peak_mb == 1200.0 and sampler.samples >= 4
    assert sampler._thread is None  # the thread ended with stop()


def test_sampler_reads_at_both_ends_and_survives_a_failing_read():
    calls = []

    def read():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("NVML gone")
        return NvmlReading(None, 500.0)

    with PeakSampler(read, interval_s=60) as sampler:  # no interval passes: start and stop read
        pass
    assert sampler.process_peak_mb is None and sampler.device_peak_mb == 500.0
    with pytest.raises(ValueError, match="interval_s"):
        PeakSampler(read, interval_s=0)


def test_nvml_fallback_prefers_the_process_and_labels_the_device_figure():
    assert nvml_peak(300.0, 2000.0) == (300.0, "process")
    assert nvml_peak(None, 2000.0) == (2000.0, "device")  # a container: NVML lists host PIDs
    assert nvml_peak(None, None) == (None, None)


def test_decorators_bare_with_options_and_as_calls():
    model = torch.nn.Linear(8, 4)

    @vitsweep.count_flops
    def forward(x):
        return model(x)

    out, flops = forward(torch.randn(3, 8))
    assert isinstance(flops, FlopStats) and out.shape == (3, 4)
    assert flops.total == 2 * 3 * 8 * 4 and flops.by_operator == {"aten.addmm": 192} and flops.gflops == 192e-9

    @vitsweep.count_flops(display=False)
    def train_step(x):
        model(x).sum().backward()  # forward + backward (input and weight gradients need only the weight's)

    assert train_step(torch.randn(3, 8)).flops.total == 2 * (2 * 3 * 8 * 4)

    @vitsweep.track_memory(device="cpu")
    def add(a, b):
        return a + b

    tracked = add(1, 2)
    assert isinstance(tracked, Tracked) and tracked.result == 3
    assert tracked.memory == MemoryStats("cpu", None, None, None, None)  # not available on a CPU, never 0
    assert set(tracked.memory.metrics()) == {"memory/peak_allocated_mb", "memory/peak_reserved_mb",
                                             "memory/peak_nvml_mb", "memory/peak_nvml_source"}
    both = vitsweep.track_memory(vitsweep.count_flops(forward.__wrapped__), device="cpu")(torch.randn(1, 8))
    assert isinstance(both.result, Counted) and both.result.flops.total == 64
    assert forward.__name__ == "forward"  # functools.wraps
    with pytest.raises(TypeError, match="expected a function"):
        vitsweep.track_memory(42)
    with vitsweep.track_memory(device="cpu") as tracker:  # the form the loop uses around an epoch
        torch.ones(4).sum()
    assert tracker.stats == MemoryStats("cpu", None, None, None, None) and tracker.metrics()["memory/peak_nvml_mb"] is None


def test_the_model_flop_count_goes_through_the_decorator():
    from finetune.models import build_vit

    model = build_vit("vit_tiny_patch16_224", 4, img_size=32, patch_size=16, depth=1)
    x = torch.zeros(1, 3, 32, 32)
    from finetune.models import readable_attention

    with readable_attention(model), torch.no_grad():
        direct = vitsweep.count_flops(model)(x).flops.total
    assert count_model_flops(model, (32, 32)) == direct > 0


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-tf32"], False)])
def test_tf32_flag_is_recorded_in_result_json(tmp_path, capsys, flag, expected):
    out = tmp_path / "run"
    code = main(["train", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "16", "--depth", "1",
                 "--data", "synthetic:classes=2,size=32,n=8,n_val=8", "--epochs", "1", "--batch-size", "8",
                 "--num-workers", "0", "--topk", "1", "--no-pretrained", "--no-progress", "--out", str(out), *flag])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "result.json").read_text())["config"]["tf32"] is expected
