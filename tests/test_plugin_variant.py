"""A plug-in attention variant, written outside the repository, used with no fork and no registration.

The variant's code is the README's example (read from README.md between its markers), so the example
is what is tested. `vitsweep train` runs it end to end in a subprocess with the module on PYTHONPATH,
and `load_weight_dict` rebuilds it from the weights sidecar in another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from orchestrator.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--model", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--patch-size", "4", "--depth", "2",
        "--data", "synthetic:classes=4,size=32,n=64,n_val=32", "--epochs", "1", "--augment", "none",
        "--num-workers", "0", "--topk", "1", "2", "--batch-size", "16"]


def readme_example() -> str:
    """The Python block between the README's plugin-example markers."""
    text = README.read_text()
    match = re.search(r"<!-- plugin-example:start -->\s*```python\n(.*?)```\s*<!-- plugin-example:end -->", text, re.S)
    assert match, "README.md lacks the plugin-example block"
    return match.group(1)


def write_module(directory: Path, name: str, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.py"
    path.write_text(readme_example() + extra)
    return path


def _vitsweep() -> list:
    script = Path(sys.executable).parent / "vitsweep"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orchestrator.cli"]


def _env(plugin_dir: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_readme_example_is_outside_any_fork_and_complete():
    code = readme_example()
    assert "class MyAttention(AttentionBase)" in code and "hparams = {" in code and "def attend" in code
    assert 15 <= len(code.strip().splitlines()) <= 35


def test_plugin_trains_through_vitsweep_and_reloads_from_its_sidecar(tmp_path):
    plugin_dir = tmp_path / "plugins"  # tmp_path is outside the repository
    write_module(plugin_dir, "tmpmod")
    out = tmp_path / "run"
    proc = subprocess.run(
        [*_vitsweep(), "train", "--variant", "tmpmod:MyAttention", "--attn", "radius=4", "--attn", "temperature=0.5",
         *TINY, "--no-progress", "--out", str(out)],
        env=_env(plugin_dir), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "finished"
    assert result["config"]["variant"] == "tmpmod:MyAttention"
    assert result["config"]["attn"] == {"radius": 4, "temperature": 0.5}
    assert result["arch"]["attn_hparams"] == {"radius": 4, "temperature": 0.5}
    assert result["metrics"]["cost/gflops"] > 0 and "val/acc1" in result["metrics"]
    sidecar = json.loads((out / "weights.json").read_text())
    assert sidecar["variant_path"] == "tmpmod:MyAttention"

    reload = """
import json, sys
from finetune.config import TrainConfig
from finetune.models.attention import AttentionBase, variant_label
from finetune.weights import load_weight_dict

model, sidecar = load_weight_dict(sys.argv[1], expected={"variant": "tmpmod:MyAttention"})
attn = [m for m in model.modules() if isinstance(m, AttentionBase)]
cfg = TrainConfig.from_dict({"variant": "tmpmod:MyAttention", "radius": 3, "features": 16, "epochs": 1})
print(json.dumps({
    "classes": sorted({type(m).__mro__[1].__module__ + ":" + type(m).__mro__[1].__name__ for m in attn}),
    "hparams": [m.hparam_values() for m in attn],
    "arch": sidecar["arch"],
    "flat": cfg.attn,
    "label": variant_label("tmpmod:MyAttention", cfg.attn),
}))
"""
    proc = subprocess.run([sys.executable, "-c", reload, str(out / "weights.safetensors")], env=_env(plugin_dir),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["classes"] == ["tmpmod:MyAttention"]
    assert loaded["hparams"] == [{"radius": 4, "temperature": 0.5}] * 2  # depth 2
    assert loaded["arch"]["variant"] == "tmpmod:MyAttention" and loaded["arch"]["attn_hparams"] == {"radius": 4, "temperature": 0.5}
    assert loaded["flat"] == {"radius": 3}  # a flat key of the plug-in moves into attn; another variant's is ignored
    assert loaded["label"] == "MyAttention r=3"


NOT_ATTENTION = """

class NotAttention:
    pass
"""


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """A unique module name (in-process imports are cached) holding the README example and a non-variant."""
    name = f"plug_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path / "plugins", name, NOT_ATTENTION)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    return name


@pytest.mark.parametrize(
    "variant, attn, fragment",
    [
        ("no_such_module_x1:MyAttention", [], "module 'no_such_module_x1' cannot be imported"),
        ("{plugin}:Nope", [], "module '{plugin}' has no attribute 'Nope'"),
        ("{plugin}:NotAttention", [], "is not a subclass of finetune.models.attention.AttentionBase"),
        ("{plugin}:MyAttention", ["nope=1"], "unknown hyperparameter(s) ['nope'] for attention variant '{plugin}:MyAttention'; allowed: radius, temperature"),
        ("{plugin}:MyAttention", ["radius=2.5"], "{plugin}:MyAttention radius=2.5 must be an integer >= 1"),
        ("{plugin}:MyAttention", ["radius=true"], "{plugin}:MyAttention radius=True must be an integer >= 1"),
        ("{plugin}:MyAttention", ["temperature=.nan"], "{plugin}:MyAttention temperature=nan must be a finite number in [0.05, 20.0]"),
        ("{plugin}:MyAttention", ["radius=65"], "radius=65 must be < N=65 tokens"),
        ("{plugin}:MyAttention", ["radius"], "--attn 'radius': expected KEY=VALUE"),
        ("linformer", ["rank=[1"], "--attn 'rank=[1': VALUE is not valid YAML"),
        ("softmx", [], "unknown attention variant 'softmx' (did you mean 'softmax'?)"),
    ],
)
def test_bad_plugin_or_value_exits_2_with_one_line_naming_it(tmp_path, capsys, plugin, variant, attn, fragment):
    out = tmp_path / "never"
    argv = ["train", "--variant", variant.format(plugin=plugin), *[a for item in attn for a in ("--attn", item)],
            *TINY, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment.format(plugin=plugin) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
