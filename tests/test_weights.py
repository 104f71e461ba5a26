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
        load_weight_dict(path, verify=False)


def test_missing_or_foreign_sidecar(tmp_path):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    sidecar = tmp_path / "w.json"
    sidecar.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(WeightsError, match="not a vitsweep weights sidecar"):
        load_weight_dict(path)
    sidecar.unlink()
    with pytest.raises(WeightsError, match="sidecar .* is missing"):
        load_weight_dict(path)


def _edit_sidecar(path, change):
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    change(data)
    sidecar.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda d: d["arch"].update(variant="performer"), "was altered after it was saved"),
        (lambda d: d["arch"].update(num_classes=7), "was altered after it was saved"),
        (lambda d: d["metrics"].update({"val/acc1": 0.99}), "was altered after it was saved"),
        (lambda d: d.update(variant_path="os:system"), "was altered after it was saved"),
        (lambda d: d.pop("sha256"), "has no checksum (sha256)"),
        (lambda d: d.update(sha256=None), "has no checksum (sha256)"),
    ],
    ids=["variant", "num_classes", "metrics", "variant_path", "checksum deleted", "checksum null"],
)
def test_an_edited_sidecar_is_refused(tmp_path, change, fragment):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH, metrics={"val/acc1": 0.5})
    _edit_sidecar(path, change)
    with pytest.raises(WeightsError, match=r"w\.json' " + fragment.replace("(", r"\(").replace(")", r"\)")):
        load_weight_dict(path)


def test_altered_tensors_are_refused_even_without_the_checksum(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    state = load_file(str(path))
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, str(path), metadata=header)  # same header, other tensors
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_weight_dict(path)
    _edit_sidecar(path, lambda d: d.pop("sha256"))
    with pytest.raises(WeightsError, match="no checksum"):
        load_weight_dict(path)


def test_weights_of_another_save_are_refused(tmp_path):
    """Two saves of the same architecture: the sidecar of one with the tensors of the other."""
    a = save_weight_dict(_model(), tmp_path / "a.safetensors", ARCH, metrics={"val/acc1": 0.1})
    b = save_weight_dict(_model(), tmp_path / "b.safetensors", ARCH, metrics={"val/acc1": 0.9})
    sums = json.loads(b.with_suffix(".json").read_text())["sha256"]
    b.write_bytes(a.read_bytes())
    _edit_sidecar(b, lambda d: d.update(sha256=sums))
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_weight_dict(b)
    from finetune.io_utils import sha256_file

    _edit_sidecar(b, lambda d: d.update(sha256=sha256_file(b)))  # checksum recomputed: the header still differs
    with pytest.raises(WeightsError, match="was altered after it was saved"):
        load_weight_dict(b)


def test_files_of_the_old_format_need_verify_false(tmp_path):
    """format_version 1: no sidecar digest in the header. Refused with how to re-save; verify=False loads."""
    from safetensors.torch import save_file

    from finetune.io_utils import sha256_file

    model = _model()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"format": "vitsweep-weights"})
    sidecar = {"format": "vitsweep-weights", "format_version": 1, "arch": ARCH, "config": ARCH,
               "variant_path": "finetune.models.attention.softmax:SoftmaxAttention", "sha256": sha256_file(path)}
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(WeightsError, match=r"older vitsweep .*verify=False.*save them again"):
        load_weight_dict(path)
    loaded, _ = load_weight_dict(path, verify=False)
    resaved = save_weight_dict(loaded, tmp_path / "new.safetensors", ARCH)
    again, _ = load_weight_dict(resaved)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_a_sidecar_without_arch_is_refused(tmp_path):
    path = save_weight_dict(_model(), tmp_path / "w.safetensors", ARCH)
    _edit_sidecar(path, lambda d: d.update(arch=5))
    with pytest.raises(WeightsError, match="no complete 'arch' entry"):
        load_weight_dict(path)
