"""`vitsweep fidelity` works for every built-in variant at its defaults, maps included (the default
``--maps 1``): before, every linformer configuration crashed drawing the maps (``shape '[-1, 65, 64]'
is invalid``), because the maps call ``attend(q, k, I_N)``, whose values are N wide, not D."""

from __future__ import annotations

import csv

import pytest
import torch

from finetune.models.attention import builtin_variants, get_attention_class
from finetune.models.attention.linformer import linformer_attention
from orchestrator.cli import main

pytestmark = pytest.mark.timeout(900)

MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "4", "--depth", "2"]
DATA = ["--data", "synthetic:classes=3,size=32,n=4,n_val=4", "--batch-size", "4", "--batches", "1"]


def _slug_exists(maps, label):
    from orchestrator.eval_cli import _slug

    return (maps / f"{_slug(label)}.png").is_file()


def test_fidelity_with_its_defaults_covers_every_builtin_variant_with_maps(tmp_path):
    out = tmp_path / "fid"
    assert main(["fidelity", *MODEL, *DATA, "--out", str(out)]) == 0
    with open(out / "fidelity.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == set(builtin_variants())
    for row in rows:
        assert row["rel_err"] not in ("", "nan"), row
    labels = {r["label"] for r in rows}
    assert len(list((out / "maps").glob("*.png"))) == len(labels) == len(builtin_variants())
    assert all(_slug_exists(out / "maps", label) for label in labels)


@pytest.mark.parametrize("attn", [["--attn", "rank=8"], ["--attn", "rank=16", "--attn", "share_kv=true"]])
def test_fidelity_maps_for_linformer_configurations(tmp_path, attn):
    out = tmp_path / "fid"
    assert main(["fidelity", *MODEL, *DATA, "--variant", "linformer", *attn, "--out", str(out)]) == 0
    assert len(list((out / "maps").glob("linformer*.png"))) == 1


@pytest.mark.parametrize("dv", [1, 7, 64, 65, 130])
def test_linformer_attention_takes_values_of_any_width(dv):
    """attend is linear in v: each column of the output depends on its own column of v only."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 65, 16), torch.randn(2, 3, 65, 16)
    v = torch.randn(2, 3, 65, dv)
    E, F = torch.randn(65, 8), torch.randn(65, 8)
    out = linformer_attention(q, k, v, E, F)  # (B, H, N, Dv)
    assert out.shape == (2, 3, 65, dv)
    column = linformer_attention(q, k, v[..., :1].contiguous(), E, F)
    torch.testing.assert_close(out[..., :1], column)


def test_every_builtin_variant_implies_an_attention_matrix():
    """`implied_attention` (attend(q, k, I_N)) for each built-in variant at its defaults: (B, H, N, N)."""
    from finetune.fidelity import implied_attention
    from finetune.models.attention import attention_layer

    for name in builtin_variants():
        hparams = {"rank": 16} if "rank" in get_attention_class(name).hparams else {}
        layer = attention_layer(name, grid_size=(8, 8), num_prefix_tokens=1, **hparams)
        module = layer(192, num_heads=3, qkv_bias=True).eval()
        q, k = torch.randn(1, 3, 65, 64), torch.randn(1, 3, 65, 64)
        with torch.no_grad():
            assert implied_attention(module, q, k).shape == (1, 3, 65, 65), name
