"""Everything about a variant is derived from its one declaration: flags, config keys, validation,
cost dispatch, sweep blocks, labels, weight transfer and FLOP counting (built-ins and plug-ins alike)."""

from __future__ import annotations

import argparse
import math
import uuid

import pytest
import torch
from safetensors.torch import save_file

from finetune.config import VARIANTS, TrainConfig
from finetune.errors import AttentionConfigError, ConfigError
from finetune.metrics import count_flops, uncounted_attention_flops
from finetune.models import build_vit, load_pretrained_weights, variant_own_parameters
from finetune.models.attention import (
    AttentionBase,
    HParam,
    builtin_variants,
    declared_hparams,
    get_attention_class,
    register_attention,
    variant_hparams,
    variant_label,
)
from finetune.models.attention.cost import attention_activation_bytes, attention_flops, uncounted_flops
from orchestrator.cli import build_parser
from search_spaces.variants import block

PLUGIN = '''
import torch
from torch import nn

from finetune.models.attention import AttentionBase, HParam


class Scaled(AttentionBase):
    """Softmax with a learned per-head logit scale (an own parameter) and no declared cost."""

    hparams = {"init": HParam(float, 1.0, "initial logit scale", minimum=0.0, short="s", sweep=(0.5, 1.0))}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logit_scale = nn.Parameter(torch.full((self.num_heads, 1, 1), self.init))  # (H, 1, 1)

    def attend(self, q, k, v):  # [B, H, N, D] -> [B, H, N, D]
        attn = (q @ k.transpose(-2, -1)) * self.scale * self.logit_scale  # (B, H, N, N)
        return attn.softmax(dim=-1) @ v


class BadName(AttentionBase):
    hparams = {"scale": HParam(float, 1.0, "clashes with AttentionBase.scale")}

    def attend(self, q, k, v):
        return v


class NotHParam(AttentionBase):
    hparams = {"x": 3}

    def attend(self, q, k, v):
        return v


class Abstract(AttentionBase):
    pass
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """Import path prefix of a module written outside the repository (unique name: imports are cached)."""
    import sys

    directory = tmp_path_factory.mktemp("plugins")
    name = f"scaled_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(PLUGIN)
    sys.path.insert(0, str(directory))
    yield name
    sys.path.remove(str(directory))


# ---------------------------------------------------------------- derived from the registry


def _train_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_builtin_hparam_is_a_train_flag_typed_by_its_declaration():
    train = _train_parser()
    flags = {opt: action for action in train._actions for opt in action.option_strings}
    assert VARIANTS == builtin_variants() == ("softmax", "linformer", "performer", "nystrom", "atrous_linear")
    for variant in VARIANTS:
        for name, hp in get_attention_class(variant).hparams.items():
            action = flags["--" + name.replace("_", "-")]
            assert variant in action.help and hp.help in action.help, name
            if hp.type is bool:
                assert "--no-" + name.replace("_", "-") in flags
            elif hp.choices is not None:
                assert tuple(action.choices) == hp.choices
            if hp.sequence:
                assert action.nargs == "+"
    assert {v for v, _ in declared_hparams()["features"]} == {"performer", "atrous_linear"}
    args = train.parse_args(["--out", "x", "--variant", "atrous_linear", "--dilation", "1", "2", "--share-kv",
                             "--kernel", "relu", "--features", "8"])
    assert (args.dilation, args.share_kv, args.kernel, args.features) == ([1, 2], True, "relu", 8)
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--fusion", "concat"])


@pytest.mark.parametrize("variant", builtin_variants())
def test_cost_dispatch_works_for_every_registered_variant(variant):
    N, D, H = 65, 16, 3
    flops = attention_flops(variant, N, D, H)
    saved = attention_activation_bytes(variant, N, D, H)
    assert isinstance(flops, int) and flops > 0 and isinstance(saved, int) and saved > 0
    assert 0 <= uncounted_flops(variant, N, D, H) < flops
    defaults = {k: hp.default for k, hp in get_attention_class(variant).hparams.items() if hp.default is not None}
    assert attention_flops(variant, N, D, H, **defaults) == flops  # unset = the declared default


def test_default_sweep_blocks_come_from_the_declarations(plugin):
    assert block("softmax") == {"variant": "softmax"}
    assert block("linformer") == {"variant": "linformer", "fixed": {"share_kv": False}, "search": {"rank": {"grid": [32, 64]}}}
    assert block("atrous_linear", dilation=((1, 2, 3), (1, 2)), features=(16,)) == {
        "variant": "atrous_linear", "fixed": {"window": 3, "features": 16},
        "search": {"dilation": {"grid": [[1, 2, 3], [1, 2]]}},
    }
    assert block(f"{plugin}:Scaled") == {"variant": f"{plugin}:Scaled", "search": {"init": {"grid": [0.5, 1.0]}}}
    with pytest.raises(ConfigError, match=r"unknown hyperparameter\(s\) \['ranks'\]; linformer declares: rank, share_kv"):
        block("linformer", ranks=(8,))
    with pytest.raises(ConfigError, match="linformer rank=0 must be an integer >= 1"):
        block("linformer", rank=(0, 8))


def test_variant_labels_use_the_short_names(plugin):
    assert variant_label("atrous_linear", {"dilation": [1, 2, 3], "window": 3, "features": 16}) == "atrous_linear dil=1,2,3 w=3 m=16"
    assert variant_label("linformer", {"rank": 16, "share_kv": None}) == "linformer k=16"
    assert variant_label("linformer", {"rank": 16, "share_kv": True}) == "linformer k=16 kv=yes"
    assert variant_label("softmax", {}) == "softmax"
    assert variant_label(f"{plugin}:Scaled", {"init": 0.5}) == "Scaled s=0.5"


def test_variant_hparams_takes_the_variants_own_keys_from_a_flat_config():
    flat = {"rank": 16, "features": 8, "share_kv": None, "lr": 0.1}
    assert variant_hparams("linformer", flat) == {"rank": 16}
    assert variant_hparams("softmax", flat) == {}


# ---------------------------------------------------------------- HParam: the one check


@pytest.mark.parametrize(
    "hp, value, fragment",
    [
        (HParam(int, 1, "h", minimum=1), True, "v k=True must be an integer >= 1"),
        (HParam(int, 1, "h", minimum=1), 2.0, "v k=2.0 must be an integer >= 1"),
        (HParam(int, 1, "h", minimum=1), "2", "v k='2' must be an integer >= 1"),
        (HParam(int, 1, "h", minimum=1, maximum=4), 5, "v k=5 must be an integer in [1, 4]"),
        (HParam(int, 3, "h", minimum=1, odd=True), 4, "v k=4 must be an odd integer >= 1"),
        (HParam(float, 1.0, "h"), math.inf, "v k=inf must be a finite number"),
        (HParam(float, 1.0, "h"), False, "v k=False must be a finite number"),
        (HParam(float, 1.0, "h", minimum=0.0), -0.5, "v k=-0.5 must be a finite number >= 0.0"),
        (HParam(bool, False, "h"), 1, "v k=1 must be true or false"),
        (HParam(str, "a", "h", choices=("a", "b")), "c", "v k='c' must be one of 'a', 'b'"),
        (HParam(int, (1,), "h", minimum=1, sequence=True), [], "v k=() must be a non-empty list of values each an integer >= 1"),
        (HParam(int, (1,), "h", minimum=1, sequence=True), [1, 0], "v k=0 (in [1, 0]) must be an integer >= 1"),
        (HParam(int, 1, "h"), None, "v k=None must be an integer"),
    ],
)
def test_hparam_refuses_with_variant_key_value_and_what_is_allowed(hp, value, fragment):
    with pytest.raises(AttentionConfigError) as err:
        hp.coerce("v", "k", value)
    assert fragment in str(err.value)


def test_hparam_canonical_values():
    np = pytest.importorskip("numpy")
    assert HParam(int, 1, "h").coerce("v", "k", np.int64(3)) == 3
    assert HParam(float, 1.0, "h").coerce("v", "k", 2) == 2.0
    assert HParam(int, (1,), "h", sequence=True).coerce("v", "k", [1, np.int64(2)]) == (1, 2)
    assert HParam(int, (1,), "h", sequence=True).coerce("v", "k", 4) == (4,)
    assert HParam(int, None, "h", optional=True).coerce("v", "k", None) is None


# ---------------------------------------------------------------- plug-ins


def test_plugin_declarations_are_checked(plugin):
    with pytest.raises(AttentionConfigError, match="name 'scale' is not an identifier or is taken by AttentionBase"):
        get_attention_class(f"{plugin}:BadName")
    with pytest.raises(AttentionConfigError, match=r"hparams\['x'\] must be an HParam"):
        get_attention_class(f"{plugin}:NotHParam")
    with pytest.raises(AttentionConfigError, match=r"does not implement attend"):
        get_attention_class(f"{plugin}:Abstract")
    with pytest.raises(AttentionConfigError, match="'package.module:ClassName'"):
        get_attention_class(f"{plugin}:")


def test_registering_a_conflicting_declaration_is_refused():
    class Conflicting(AttentionBase):
        hparams = {"rank": HParam(float, 1.0, "a rank that is a float")}

        def attend(self, q, k, v):
            return v

    with pytest.raises(AttentionConfigError, match="declares 'rank' as float, but 'linformer' declares it differently"):
        register_attention("conflicting")(Conflicting)
    assert "conflicting" not in builtin_variants()


def test_plugin_config_weights_and_flops_without_a_cost_model(plugin, tmp_path):
    variant = f"{plugin}:Scaled"
    cfg = TrainConfig.from_dict({"variant": variant, "init": 2, "rank": 16, "features": 8})
    assert cfg.attn == {"init": 2.0} and cfg.attention_hparams() == {"init": 2.0}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): 'inti'"):
        TrainConfig.from_dict({"variant": variant, "inti": 2})
    assert attention_flops(variant, 65, 16, 3) is None and uncounted_flops(variant, 65, 16, 3) == 0

    torch.manual_seed(0)
    stock = build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2)
    path = tmp_path / "stock.safetensors"
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, str(path))
    model = build_vit("vit_tiny_patch16_224", 5, img_size=32, patch_size=4, depth=2, variant=variant,
                      attn_hparams=cfg.attention_hparams())
    assert variant_own_parameters(model) == {"blocks.0.attn.logit_scale", "blocks.1.attn.logit_scale"}
    report = load_pretrained_weights(model, str(path))
    assert set(report["missing"]) == variant_own_parameters(model)
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, stock.blocks[1].attn.qkv.weight)
    assert model.blocks[0].attn.logit_scale.flatten().tolist() == [2.0] * 3
    assert uncounted_attention_flops(model) == 0 and count_flops(model, (32, 32)) > 0
