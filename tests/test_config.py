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
    assert cfg.dilation == (1, 2) and cfg.topk == (3,)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"variant": "softmx"}, "variant='softmx'"),
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
