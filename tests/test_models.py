import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.models import WeightsError, build_vit, vit_geometry
from finetune.models.attention import AttentionConfigError, attention_layer, check_attention, get_attention_class


def test_geometry_of_resized_model():
    assert vit_geometry("vit_tiny_patch16_224", 32, 4) == ((8, 8), 1, 192, 3)
    assert vit_geometry("vit_small_patch16_224", None, None) == ((14, 14), 1, 384, 6)


def test_softmax_variant_equals_timm_stock_attention():
    torch.manual_seed(0)
    stock = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=4, depth=2).eval()
    ours = build_vit("vit_tiny_patch16_224", 7, img_size=32, patch_size=4, depth=2).eval()
    assert ours.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=1e-6)
        for block in ours.blocks:
            block.attn.fused_attn = False  # the readable path has the same math
        torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)


def test_unknown_variant_and_hparam_are_clear():
    with pytest.raises(AttentionConfigError, match="unknown attention variant 'linformr'.*did you mean 'linformer'"):
        get_attention_class("linformr")
    with pytest.raises(AttentionConfigError, match=r"unknown hyperparameter\(s\) \['rank'\] for attention variant 'softmax'"):
        attention_layer("softmax", grid_size=(8, 8), num_prefix_tokens=1, rank=4)
    check_attention("softmax", dim=192, num_heads=3, grid_size=(8, 8), num_prefix_tokens=1)


def test_unknown_model_name():
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match="model='vit_tinyy_patch16_224' is not a timm model"):
        vit_geometry("vit_tinyy_patch16_224", None, None)


def _reference_weights(tmp_path: Path, num_classes=1000, **kw) -> Path:
    torch.manual_seed(1)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, depth=2, **kw)
    path = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path


def test_local_safetensors_transfer_with_resampling_and_new_head(tmp_path):
    path = _reference_weights(tmp_path, img_size=64, patch_size=8)
    model = build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, weights=str(path))
    from safetensors.torch import load_file

    ref = load_file(str(path))
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, ref["blocks.1.attn.qkv.weight"])
    assert model.head.weight.shape == (5, 192)
    assert model.pos_embed.shape == (1, 65, 192)  # resampled from 1 + 8x8 at 64/8 to 1 + 8x8 at 32/4


def test_timm_pth_checkpoint_loads_with_weights_only(tmp_path):
    torch.manual_seed(2)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=4, depth=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, path)
    model = build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, weights=str(path))
    torch.testing.assert_close(model.head.weight, ref.head.weight)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": evil}, f)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, weights=str(path))
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch16_224", num_classes=5, img_size=32, patch_size=4, depth=2)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="different architecture"):
        build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, weights=str(path))


@pytest.mark.parametrize("name, content, fragment", [
    ("missing.safetensors", None, "does not exist"),
    ("trunc.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "not a readable safetensors"),
    ("weights.txt", b"hello", "suffix '.txt'"),
])
def test_bad_weight_files(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=fragment):
        build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, weights=str(path))


def test_hub_path_reads_the_local_hf_cache(tmp_path, monkeypatch):
    """`--pretrained` goes through huggingface_hub; offline it is served from a pre-filled cache."""
    import huggingface_hub.constants as hf_constants

    repo_dir = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(3)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=21843, depth=2)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = build_vit("vit_tiny_patch16_224", 10, depth=2, pretrained=True, pretrained_tag="augreg_in21k")
    torch.testing.assert_close(model.blocks[0].attn.proj.weight, ref.blocks[0].attn.proj.weight)
    with pytest.raises(WeightsError, match="not in the local Hugging Face cache"):
        build_vit("vit_tiny_patch16_224", 10, depth=2, pretrained=True, pretrained_tag="augreg_in1k")
