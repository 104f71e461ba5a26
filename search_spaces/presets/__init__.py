"""Named sweeps, big_vision style: each preset composes the variant modules and the optimiser space in
a few lines. YAML files in this directory are presets too (``--preset smoke_asha`` reads
``smoke_asha.yaml``); any other YAML file is passed with ``--config FILE`` (schema: `search_spaces.spec`).
Both give the raw mapping; `search_spaces.load_sweep` parses and validates it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Dict, List

from finetune.errors import ConfigError
from finetune.yaml_io import read_yaml_file

from .. import optim, variants

PRESET_DIR = Path(__file__).parent


def smoke() -> dict:
    """Offline, CPU, minutes: every variant once on a small synthetic task (vit_tiny cut to 6 blocks,
    32 px, 8x8 grid). CPU-only, so its trials share worker processes (`SweepSpec.actor_reuse`, the
    default for ``resources.gpu: 0``): no GPU memory to free, and each trial after a process's first skips
    the process start and the imports of torch and timm (see BENCHMARKS.md, sweep overhead)."""
    return {
        "name": "smoke",
        "fixed": {
            "model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None,
            "img_size": 32, "patch_size": 4, "depth": 6, "augment": "none", "num_workers": 0,
            "data": "synthetic:classes=10,size=32,n=800,n_val=200",
            "epochs": 2, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 0.5,
            "device": "auto", "precision": "fp32", "eval_at_start": True,
        },
        "variants": [
            variants.block("softmax"),
            variants.block("linformer", rank=(16,)),
            variants.block("performer", features=(32,)),
            variants.block("nystrom", landmarks=(16,)),
            variants.block("atrous_linear", dilation=((1, 2, 3),), window=(3,), features=(16,)),
        ],
        "seeds": [0],
        "searcher": "grid",
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 1,
    }


def imagenet100() -> dict:
    """The study: pretrained ViT-S/16 (in21k) on ImageNet-100, every variant, a small grid, 3 seeds.

    Trials read decoded images: the driver decodes ImageNet-100 once, before any trial, into a 256 px
    uint8 cache (~25 GB; `orchestrator.data_cache`), so img/s measures the model, not JPEG decoding
    (docs/performance.md). On a cluster, give the cache a directory every node mounts (--data-cache DIR)."""
    return {
        "name": "imagenet100",
        "fixed": {
            "model": "vit_small_patch16_224", "pretrained": True, "data": "imagenet100",
            "epochs": 30, "batch_size": 128, "weight_decay": 0.05, "warmup_epochs": 3,
            "precision": "bf16", "num_workers": 8, "layer_decay": 0.75, "drop_path": 0.1, "eval_at_start": True,
        },
        "search": optim.grid(lr=(5e-4, 1e-3)),
        "variants": [
            variants.block("softmax"),
            variants.block("linformer", rank=(64, 128)),
            variants.block("performer", features=(64, 128)),
            variants.block("nystrom", landmarks=(32, 64)),
            variants.block("atrous_linear", dilation=((1, 2, 3), (1, 2)), window=(3,), features=(64,)),
        ],
        "seeds": [0, 1, 2],
        "resources": {"cpu": 8, "gpu": 1},
        "max_failures": 2,
        "data_cache": {"size": 256, "dir": None},
    }


def scaling() -> dict:
    """More tokens: the same variants at 224, 320 and 448 px (197, 401, 785 tokens), from a 512 px cache
    (448 / crop_pct 0.9 = 498 px is the largest resize the eval transform asks for; ~100 GB)."""
    spec = imagenet100()
    spec["name"] = "scaling"
    spec["fixed"] = {**spec["fixed"], "epochs": 10, "batch_size": 64, "lr": 1e-3}
    spec["search"] = {"img_size": {"grid": [224, 320, 448]}}
    spec["data_cache"] = {"size": 512, "dir": None}
    spec["variants"] = [
        variants.block("softmax"),
        variants.block("linformer", rank=(128,)),
        variants.block("performer", features=(128,)),
        variants.block("nystrom", landmarks=(64,)),
        variants.block("atrous_linear", dilation=((1, 2, 3),), window=(3,), features=(64,)),
    ]
    spec["seeds"] = [0]
    return spec


def optuna_smoke() -> dict:
    """The smoke task searched by Optuna TPE over variants and the optimiser space (conditional)."""
    spec = smoke()
    spec["name"] = "optuna_smoke"
    spec["fixed"] = {k: v for k, v in spec["fixed"].items() if k not in ("lr", "weight_decay", "warmup_epochs")}
    spec["search"] = optim.space(lr=(1e-4, 3e-3), warmup_epochs=(0.0, 0.5))
    spec["variants"] = [
        variants.block("softmax"),
        variants.block("linformer", rank=(8, 16, 32)),
        variants.block("performer", features=(16, 32)),
        variants.block("atrous_linear", dilation=((1, 2, 3), (1, 1, 2)), window=(3,), features=(16,)),
    ]
    spec["searcher"] = "optuna"
    spec["num_samples"] = 8
    return spec


PRESETS: Dict[str, Callable[[], dict]] = {
    "smoke": smoke,
    "imagenet100": imagenet100,
    "scaling": scaling,
    "optuna_smoke": optuna_smoke,
}


def preset_names() -> List[str]:
    return sorted(set(PRESETS) | {p.stem for p in PRESET_DIR.glob("*.yaml")})


def preset_values(name: str) -> Any:
    """A preset by name (Python function or YAML file in this directory), in the `SweepSpec` schema."""
    if name in PRESETS:
        return PRESETS[name]()
    path = PRESET_DIR / f"{name}.yaml"
    if path.is_file():
        return read_sweep_file(path)
    names = preset_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(names)}")


def read_sweep_file(path: str | Path) -> Any:
    """The YAML document of a sweep file (schema in `search_spaces.spec`; `SweepSpec.from_dict` checks it).
    At most 1 MiB of UTF-8 text, without aliases (`finetune.yaml_io`)."""
    return read_yaml_file(path, "--config")
