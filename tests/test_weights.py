import json

import pytest
import torch

from finetune.models import WeightsError, build_vit
from finetune.weights import load_weight_dict, save_weight_dict

ARCH = dict(model="vit_tiny_patch16_224", variant="softmax", attn_hparams={}, img_size=32, patch_size=4, depth=2, num_classes=6)


def _model():
    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", 6, img_size=32, patch_size=4, depth=2).eval()


def test_save_load_gives_identical_outputs(tmp_path):
    model = _model()
    path = save_weight_dict(model, tmp_path / "w", ARCH, metrics={"val/acc1": 0.5}, preprocessing={"mean": [0.5] * 3})
    assert path.name == "w.safetensors" and (tmp_path / "w.json").is_file()
    loaded, sidecar = load_weight_dict(path, expected={"variant": "softmax", "num_classes": 6})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    assert sidecar["metrics"]["val/acc1"] == 0.5 and sidecar["arch"]["depth"] == 2


def test_mismatched_config_is_refused(tmp_path):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    with pytest.raises(WeightsError, match="variant: file has 'softmax', expected 'performer'"):
        load_weight_dict(path, expected={"variant": "performer"})


def test_truncated_file_is_refused(tmp_path):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_weight_dict(path)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weight_dict(path, verify_checksum=False)


def test_missing_or_foreign_sidecar(tmp_path):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    sidecar = tmp_path / "w.json"
    sidecar.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(WeightsError, match="not a vitsweep weights sidecar"):
        load_weight_dict(path)
    sidecar.unlink()
    with pytest.raises(WeightsError, match="sidecar .* is missing"):
        load_weight_dict(path)
