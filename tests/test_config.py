import pytest

from finetune.config import ConfigError, TrainConfig


def test_defaults_validate():
    cfg = TrainConfig()
    cfg.validate()
    assert cfg.variant == "softmax" and cfg.pretrained_tag == "augreg_in21k"


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        TrainConfig.from_dict({"epoch": 3})


def test_round_trip_through_dict():
    cfg = TrainConfig.from_dict({"dilation": [1, 2], "topk": 3, "variant": "atrous_linear"})
    assert cfg.attn == {"dilation": (1, 2)} and cfg.topk == (3,)
    assert cfg.to_dict()["attn"] == {"dilation": [1, 2]}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_flat_attention_keys_move_into_attn_or_are_ignored():
    """Flat keys of the chosen variant go into `attn`; those of other variants are ignored (a sweep's
    shared fixed values); None means unset; `attn:` as a mapping works too, flat keys win over it."""
    cfg = TrainConfig.from_dict({"variant": "linformer", "rank": 16, "features": 32, "window": None, "share_kv": None})
    assert cfg.attn == {"rank": 16} and cfg.attention_hparams() == {"rank": 16}
    assert TrainConfig.from_dict({"variant": "softmax", "rank": 16, "dilation": [1]}).attn == {}
    cfg = TrainConfig.from_dict({"variant": "performer", "attn": {"features": 8, "kernel": "relu"}, "features": 16})
    assert cfg.attn == {"features": 16, "kernel": "relu"}
    assert cfg.replace(features=32).attn == {"features": 32, "kernel": "relu"}


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"variant": "softmax", "attn": {"rank": 4}}, "unknown hyperparameter(s) ['rank'] for attention variant 'softmax'"),
        ({"variant": "linformer", "rank": True}, "linformer rank=True must be an integer >= 1"),
        ({"variant": "linformer", "rank": 2.0}, "linformer rank=2.0 must be an integer >= 1"),
        ({"variant": "linformer", "share_kv": 1}, "linformer share_kv=1 must be true or false"),
        ({"variant": "performer", "kernel": "cos"}, "performer kernel='cos' must be one of 'softmax', 'relu'"),
        ({"variant": "atrous_linear", "dilation": [1, "2"]}, "atrous_linear dilation='2' (in [1, '2']) must be an integer >= 1"),
        ({"variant": "atrous_linear", "dilation": "12"}, "atrous_linear dilation='12' must be a non-empty list"),
        ({"variant": "linformer", "attn": [16]}, "attn=[16] must be a mapping"),
        ({"variant": "linformr"}, "unknown attention variant 'linformr' (did you mean 'linformer'?)"),
        ({"ranks": 16}, "'ranks' (did you mean 'rank'?)"),
    ],
)
def test_bad_attention_values_name_variant_key_and_value(values, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(values)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"variant": "softmx"}, "unknown attention variant 'softmx'"),
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": -4}, "batch_size=-4"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1e-3}, "lr=-0.001"),
        ({"img_size": 30, "patch_size": 4}, "img_size=30 is not divisible by patch_size=4"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"topk": [0]}, "topk=[0]"),
        ({"scale": [0.9, 0.1]}, "scale=[0.9, 0.1]"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"warmup_epochs": 5, "epochs": 3}, "warmup_epochs=5"),
        ({"pretrained": True, "weights": "x.safetensors"}, "not both"),
    ],
)
def test_bad_values_name_the_value(change, fragment):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(change)
    assert fragment in str(err.value)
