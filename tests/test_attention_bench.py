"""`benchmarks.attention`: runs end to end on a toy configuration and writes a complete report."""

from __future__ import annotations

import json

import pytest

from benchmarks.attention import OUR_VARIANTS, format_table, main, parse_args


def test_attention_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--tokens", "26", "50", "--batch", "1", "--repeats", "2", "--dim", "32", "--heads", "2", "--rank", "4",
            "--features", "4", "--landmarks", "4", "--window", "3", "--dilation", "1", "2", "--threads", "1",
            "--device", "cpu", "--no-reference", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["memory_kind"].startswith("autograd-saved")
    rows = {(r["variant"], r["tokens"]): r for r in report["results"]}
    assert set(rows) == {(v, n) for v in OUR_VARIANTS for n in (26, 50)}
    for (variant, _), r in rows.items():
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["memory_mb"] > 0
        assert r["core_gflops_per_image"] > 0
        if variant == "softmax":
            assert r["speedup_vs_sdpa"] == 1.0
    printed = capsys.readouterr().out
    assert format_table(report) in printed and "| atrous_linear |" in printed


@pytest.mark.parametrize("argv,needle", [(["--tokens", "200"], "1 + a square"), (["--dim", "30", "--heads", "4"], "divisible")])
def test_attention_benchmark_rejects_bad_geometry(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert needle in str(exit_info.value.code) + capsys.readouterr().err


def test_attention_benchmark_core_scope_and_reference_ratio(tmp_path, capsys):
    """Both scopes, each with its rows; with the reference packages installed, ours carry `x ref`."""
    out = tmp_path / "bench.json"
    variants = ["softmax", "linformer", "performer", "nystrom"]
    argv = ["--tokens", "26", "--batch", "1", "--repeats", "1", "--dim", "32", "--heads", "2", "--rank", "4",
            "--features", "4", "--landmarks", "4", "--threads", "1", "--device", "cpu", "--scope", "both",
            "--variants", *variants, "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(r["scope"], r["variant"]): r for r in report["results"]}
    refs = sorted({name for _, name in rows if name.startswith("ref_")})
    assert set(rows) == {(s, v) for s in ("layer", "core") for v in variants + refs}
    for (scope, variant), r in rows.items():
        assert r["tokens"] == 26 and len(r["times_ms"]) == 1 and r["median_ms"] > 0 and r["memory_mb"] >= 0
        if variant == "softmax":
            assert r["speedup_vs_sdpa"] == 1.0
        reference = f"ref_{variant}" if f"ref_{variant}" in refs else None
        assert r["reference"] == reference
        if reference is None:
            assert r["speedup_vs_ref"] is None
        else:
            expected = rows[(scope, reference)]["median_ms"] / r["median_ms"]
            assert r["speedup_vs_ref"] == pytest.approx(expected)
    table = format_table(report)
    assert table in capsys.readouterr().out
    assert "| core | softmax |" in table and "| layer | nystrom |" in table
    for ref in refs:
        assert f"| core | {ref} |" in table
        assert "x ref" in table


def test_attention_benchmark_core_scope_alone(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--tokens", "26", "--batch", "1", "--repeats", "1", "--dim", "32", "--heads", "2", "--rank", "4",
            "--threads", "1", "--device", "cpu", "--scope", "core", "--variants", "softmax", "linformer",
            "--no-reference", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert {(r["scope"], r["variant"]) for r in report["results"]} == {("core", "softmax"), ("core", "linformer")}
    assert all(r["speedup_vs_ref"] is None for r in report["results"])


def test_attention_benchmark_default_tokens_cover_the_goal():
    assert parse_args([]).tokens == [197, 577, 3137]
    assert parse_args([]).scope == "both"


def test_attention_benchmark_qkv_bias_flag():
    assert parse_args([]).qkv_bias is True
    assert parse_args(["--no-qkv-bias"]).qkv_bias is False
