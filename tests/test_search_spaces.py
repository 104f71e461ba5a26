"""Search spaces, presets, the YAML schema and validation before Ray starts (no Ray instance here)."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
from conftest import TINY_SWEEP_FIXED, write_sweep_yaml

from finetune.config import TrainConfig
from finetune.errors import AttentionConfigError, ConfigError
from search_spaces import Domain, ResolvedSweep, SweepOverrides, SweepSpec, count_trials, load_sweep, preset_names
from search_spaces.validate import validate_resources
from trainables.layout import flatten_trial_config, trial_label

TINY = {**TINY_SWEEP_FIXED, "epochs": 3, "num_workers": 0}


def spec_of(**values) -> SweepSpec:
    return SweepSpec.from_dict({"fixed": dict(TINY), **values})


def resolve(**values) -> ResolvedSweep:
    return load_sweep({"fixed": dict(TINY), **values})


# ------------------------------------------------------------------------------------------ presets
# name: (trials, most epochs, trials a finished sweep must hold)
PRESETS = {
    "smoke": (5, 2, 5),
    "smoke_asha": (4, 4, 4),
    "optuna_smoke": (8, 2, None),  # optuna: num_samples trials, sampled
    # 1 softmax + 2 ranks + 2 feature counts + 2 landmark counts + 2 dilation sets, x 2 lrs x 3 seeds
    "imagenet100": (9 * 2 * 3, 30, 9 * 2 * 3),
    "scaling": (5 * 3, 10, 5 * 3),  # every variant at 3 image sizes
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_with_its_trial_count_and_epochs(name):
    resolved = load_sweep(name)
    assert resolved.checked_configs and all(isinstance(c, TrainConfig) for c in resolved.checked_configs)
    assert (resolved.num_trials, resolved.max_epochs, resolved.expected_trials) == PRESETS[name]
    assert resolved.geometry_checked and resolved.spec.source == f"preset:{name}"
    assert name in preset_names()


def test_smoke_preset_covers_every_variant_offline_on_cpu():
    spec = load_sweep("smoke").spec
    assert sorted(b.variant for b in spec.variants) == sorted(
        ["softmax", "linformer", "performer", "nystrom", "atrous_linear"])
    assert spec.fixed["data"].startswith("synthetic") and spec.fixed["pretrained"] is False
    assert spec.fixed["num_workers"] == 0 and spec.resources == {"cpu": 1, "gpu": 0}


def test_imagenet100_preset_is_the_study():
    spec = load_sweep("imagenet100").spec
    assert spec.fixed["model"] == "vit_small_patch16_224" and spec.fixed["pretrained"] is True
    assert spec.fixed["data"] == "imagenet100" and spec.seeds == [0, 1, 2]
    assert len({b.variant for b in spec.variants}) == 5


def test_unknown_preset_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown preset 'smok' \(did you mean 'smoke'\?\)"):
        load_sweep("smok")


def test_overrides_are_merged_before_the_one_parse(validation_calls):
    calls = validation_calls
    overrides = SweepOverrides(num_samples=2, cpus_per_trial=2, gpus_per_trial=0.5, max_concurrent=3,
                               scheduler="asha", max_failures=0, fixed={"epochs": 3, "lr": 2e-3})
    resolved = load_sweep("smoke", overrides, local_resources=(2.0, 1.0))
    spec = resolved.spec
    assert (spec.num_samples, spec.max_concurrent, spec.scheduler, spec.max_failures) == (2, 3, "asha", 0)
    assert spec.resources == {"cpu": 2, "gpu": 0.5} and spec.fixed["lr"] == 2e-3 and spec.fixed["depth"] == 6
    assert (resolved.num_trials, resolved.max_epochs, resolved.local_resources) == (10, 3, (2.0, 1.0))
    assert calls == {"check_options": 1, "check_config": 5}  # once; one geometry per smoke variant

    # a resumed sweep, validated when it was run, is rebuilt from its marker without the geometry checks
    calls.update(check_options=0, check_config=0)
    again = load_sweep(spec.to_dict(), source_name=spec.source, check_geometry=False)
    assert calls == {"check_options": 1, "check_config": 0}
    assert again.spec.to_dict() == spec.to_dict() and again.spec.source == "preset:smoke"
    assert (again.num_trials, again.max_epochs, again.geometry_checked) == (10, 3, False)


def test_bad_overrides_fail_like_bad_presets():
    with pytest.raises(ConfigError, match=r"num_samples=0 must be a positive integer"):
        load_sweep("smoke", SweepOverrides(num_samples=0))
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        load_sweep("smoke", SweepOverrides(fixed={"epoch": 1}))
    with pytest.raises(ConfigError, match=r"gpus per trial=1 but the cluster has 0 GPU"):
        load_sweep("smoke", SweepOverrides(gpus_per_trial=1), local_resources=(2.0, 0.0))


def test_a_sweep_spec_resolves_to_an_equal_spec():
    spec = spec_of(variants=["softmax", {"variant": "linformer", "search": {"rank": {"grid": [8, 16]}}}])
    resolved = load_sweep(spec, SweepOverrides(searcher="random", num_samples=3))
    assert resolved.spec.searcher == "random" and resolved.num_trials == 3 and resolved.expected_trials is None
    assert load_sweep(spec).spec.to_dict() == spec.to_dict()


# ------------------------------------------------------------------------------------------ domains
def test_domains_parse_and_convert():
    d = Domain.parse("lr", {"loguniform": [1e-4, 1e-2]})
    assert d.extremes() == [1e-4, 1e-2]
    assert type(d.to_tune()).__name__ == "Float"
    assert Domain.parse("rank", {"grid": [8, 16]}).to_tune() == {"grid_search": [8, 16]}
    r = Domain.parse("rank", {"randint": [8, 16]}).to_tune()
    assert (r.lower, r.upper) == (8, 17)  # inclusive high in the schema, exclusive in Tune


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"loguniform": [1e-2, 1e-4]}, r"bounds are reversed or equal \(low=0.01 must be < high=0.0001\)"),
        ({"uniform": [1, 1]}, r"low=1 must be < high=1"),
        ({"loguniform": [0, 1]}, r"low=0 must be > 0"),
        ({"logunifrom": [1e-4, 1e-2]}, r"unknown domain 'logunifrom' \(did you mean 'loguniform'\?\)"),
        ({"randint": [1.5, 3]}, r"must be integers"),
        ({"grid": []}, r"non-empty list"),
        ({"uniform": [1, 2, 3]}, r"exactly \[low, high\]"),
    ],
)
def test_bad_domains_are_rejected_naming_the_value(spec, message):
    with pytest.raises(ConfigError, match=message):
        Domain.parse("lr", spec)


# ------------------------------------------------------------------------------------------ validation
def test_unknown_config_keys_are_named_with_suggestions():
    with pytest.raises(ConfigError, match=r"'lrr' \(did you mean 'lr'\?\)"):
        resolve(search={"lrr": {"grid": [1e-3]}})
    with pytest.raises(ConfigError, match=r"'ranks' \(did you mean 'rank'\?\)"):
        resolve(variants=[{"variant": "linformer", "fixed": {"ranks": 8}}])
    with pytest.raises(ConfigError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        load_sweep({"fixed": {**TINY, "epoch": 2}})
    with pytest.raises(ConfigError, match=r"'variant' \(did you mean 'variants'\?\)"):
        SweepSpec.from_dict({"fixed": TINY, "variant": ["softmax"]})


def test_unknown_variant_is_named():
    with pytest.raises(AttentionConfigError, match=r"variants\[1\].variant: unknown attention variant 'linformr' "
                                                   r"\(did you mean 'linformer'\?\)"):
        spec_of(variants=["softmax", "linformr"])
    with pytest.raises(AttentionConfigError, match=r"variants\[0\].variant: .*'no_such_module:Attention'"):
        spec_of(variants=["no_such_module:Attention"])
    with pytest.raises(ConfigError, match=r"variants\[0\].variant=3 must be a variant name"):
        spec_of(variants=[{"variant": 3}])


PLUGIN = """
from finetune.models.attention import AttentionBase, HParam, softmax_attention


class MyAttention(AttentionBase):
    hparams = {"myparam": HParam(int, 1, "a test knob", minimum=1)}

    def __init__(self, *args, myparam: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.myparam = myparam

    def attend(self, q, k, v):
        return softmax_attention(q, k, v)
"""


def test_a_plugin_variant_is_swept_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "sweep_plugin_attention.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = {"variant": "sweep_plugin_attention:MyAttention", "search": {"myparam": {"grid": [1, 2]}}}
    resolved = resolve(variants=["softmax", plugin])
    assert [b.label for b in resolved.spec.variants] == ["softmax", "MyAttention"]
    assert resolved.num_trials == 3 and len(resolved.checked_configs) == 3
    with pytest.raises(ConfigError, match=r"variant 'MyAttention' with myparam=0: .*myparam=0 must be an integer >= 1"):
        resolve(variants=[{**plugin, "search": {"myparam": {"grid": [0, 2]}}}])


def test_sections_that_are_not_mappings_are_named():
    with pytest.raises(ConfigError, match=r"fixed must be a mapping of TrainConfig keys, got \['epochs'\]"):
        SweepSpec.from_dict({"fixed": ["epochs"]})
    with pytest.raises(ConfigError, match=r"variants\[0\].fixed must be a mapping"):
        spec_of(variants=[{"variant": "linformer", "fixed": [8]}])
    with pytest.raises(ConfigError, match=r"resources must be a mapping"):
        load_sweep({"fixed": dict(TINY), "resources": 2}, SweepOverrides(cpus_per_trial=1))


def test_rank_range_beyond_the_token_count_is_rejected():
    resolve(variants=[{"variant": "linformer", "search": {"rank": {"randint": [8, 64]}}}])
    with pytest.raises(ConfigError, match=r"variant 'linformer' with rank=65.*65 tokens"):
        resolve(variants=[{"variant": "linformer", "search": {"rank": {"randint": [8, 65]}}}])
    with pytest.raises(ConfigError, match=r"rank=128"):
        resolve(variants=[{"variant": "linformer", "search": {"rank": {"grid": [16, 128]}}}])


def test_dilation_that_does_not_fit_the_grid_is_rejected():
    ok = {"variant": "atrous_linear", "fixed": {"window": 3, "features": 16},
          "search": {"dilation": {"grid": [[1, 2, 3]]}}}
    resolve(variants=[ok])
    bad = {**ok, "search": {"dilation": {"grid": [[1, 2, 3], [1, 2, 8]]}}}
    with pytest.raises(ConfigError, match=r"variant 'atrous_linear' with dilation=\[1, 2, 8\]"):
        resolve(variants=[bad])


def test_both_ends_of_a_shared_range_are_checked():
    # warmup_epochs must stay below epochs=3: the range's high end is what fails.
    with pytest.raises(ConfigError, match=r"warmup_epochs=5"):
        resolve(search={"warmup_epochs": {"uniform": [0.0, 5.0]}})


def test_bad_sweep_options_are_named():
    with pytest.raises(ConfigError, match=r"searcher='bayes' is not allowed"):
        spec_of(searcher="bayes")
    with pytest.raises(ConfigError, match=r"scheduler='ashaa' is not allowed \(did you mean 'asha'\?\)"):
        spec_of(scheduler="ashaa")
    with pytest.raises(ConfigError, match=r"gpus per trial=1.5: a trial process drives one device; .*--workers-per-trial"):
        spec_of(resources={"gpu": 1.5})
    with pytest.raises(ConfigError, match=r"seeds=\[0, 1\]: optuna samples one configuration"):
        spec_of(searcher="optuna", num_samples=4, seeds=[0, 1])
    with pytest.raises(ConfigError, match=r"num_samples=0"):
        spec_of(num_samples=0)


def test_resources_beyond_the_cluster_are_rejected():
    spec = spec_of(resources={"cpu": 1, "gpu": 1})
    with pytest.raises(ConfigError, match=r"gpus per trial=1 but the cluster has 0 GPU"):
        validate_resources(spec, available_cpus=2, available_gpus=0)
    validate_resources(spec, available_cpus=2, available_gpus=2)
    with pytest.raises(ConfigError, match=r"cpus per trial=4 but the cluster has 2 CPU"):
        validate_resources(spec_of(resources={"cpu": 4}), available_cpus=2, available_gpus=0)


# ------------------------------------------------------------------------------------------ YAML
def test_yaml_config_file_round_trip(tmp_path):
    path = write_sweep_yaml(tmp_path, """
        name: mine
        search:
          lr: {loguniform: [1.0e-4, 3.0e-3]}
        variants:
          - softmax
          - {variant: linformer, search: {rank: {grid: [16, 32]}}}
          - {variant: atrous_linear, fixed: {window: 3}, search: {dilation: {choice: [[1, 2, 3], [1, 1, 2]]}}}
        seeds: [0, 1]
        searcher: grid
        scheduler: asha
        asha: {grace_period: 1, reduction_factor: 3}
        resources: {cpu: 2, gpu: 0.5}
        max_failures: 2
    """, epochs=3)
    resolved = load_sweep(Path(path))
    spec = resolved.spec
    assert spec.name == "mine" and spec.scheduler == "asha" and spec.asha["reduction_factor"] == 3
    assert spec.resources == {"cpu": 2, "gpu": 0.5} and spec.seeds == [0, 1]
    assert spec.source == f"config:{Path(path).resolve()}"
    assert resolved.num_trials == (1 + 2 + 1) * 2 and resolved.max_epochs == 3
    assert load_sweep(path).spec.to_dict() == spec.to_dict()  # a str ending in .yaml is a file too
    again = SweepSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict()


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fixed: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("fixd: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"'fixd' \(did you mean 'fixed'\?\)"):
        load_sweep(typo)


# ------------------------------------------------------------------------------------------ Tune spaces
def test_grid_space_expands_each_variant_only_with_its_own_hyperparameters():
    from ray.tune.search.variant_generator import generate_variants

    from search_spaces.tune_space import param_space

    spec = spec_of(
        variants=[
            "softmax",
            {"variant": "linformer", "search": {"rank": {"grid": [8, 16]}}},
            {"variant": "performer", "search": {"features": {"grid": [16, 32, 64]}}},
        ],
        seeds=[0, 1],
    )
    configs = [flatten_trial_config(cfg) for _, cfg in generate_variants(param_space(spec))]
    assert len(configs) == count_trials(spec) == (1 + 2 + 3) * 2
    for cfg in configs:
        TrainConfig.from_dict(cfg)  # every trial config is a valid TrainConfig
        assert ("rank" in cfg) == (cfg["variant"] == "linformer")
        assert ("features" in cfg) == (cfg["variant"] == "performer")
    assert sorted({(c["variant"], c.get("rank"), c.get("features")) for c in configs}, key=str) == sorted(
        {("softmax", None, None), ("linformer", 8, None), ("linformer", 16, None), ("performer", None, 16),
         ("performer", None, 32), ("performer", None, 64)}, key=str)


def test_random_space_samples_variant_blocks():
    from ray.tune.search.variant_generator import generate_variants

    from search_spaces.tune_space import param_space

    spec = spec_of(searcher="random", num_samples=1,
                   variants=["softmax", {"variant": "linformer", "search": {"rank": {"grid": [8, 16]}}}],
                   search={"lr": {"loguniform": [1e-4, 1e-2]}})
    seen = set()
    for _ in range(30):
        for _, cfg in generate_variants(param_space(spec)):
            flat = flatten_trial_config(cfg)
            assert 1e-4 <= flat["lr"] <= 1e-2
            seen.add((flat["variant"], flat.get("rank")))
    assert seen == {("softmax", None), ("linformer", 8), ("linformer", 16)}


def count_parses(monkeypatch) -> list:
    """A spy on `SweepSpec.from_dict`: the returned list holds its call count."""
    count = [0]
    from_dict = SweepSpec.from_dict.__func__

    def spy(cls, *args, **kwargs):
        count[0] += 1
        return from_dict(cls, *args, **kwargs)

    monkeypatch.setattr(SweepSpec, "from_dict", classmethod(spy))
    return count


def test_optuna_define_by_run_is_conditional_and_picklable(monkeypatch):
    from search_spaces.tune_space import DefineByRun

    spec = load_sweep("optuna_smoke").spec
    space = pickle.loads(pickle.dumps(DefineByRun(spec)))
    parses = count_parses(monkeypatch)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    variants = set()
    for _ in range(25):
        trial = study.ask()
        flat = flatten_trial_config(space(trial))
        cfg = TrainConfig.from_dict(flat)
        variants.add(cfg.variant)
        assert 1e-4 <= cfg.lr <= 3e-3
        params = trial.params
        if cfg.variant == "linformer":
            assert flat["rank"] in (8, 16, 32)
        else:
            assert not any(k.endswith("linformer.rank") for k in params)
        if cfg.variant == "atrous_linear":
            assert list(flat["dilation"]) in ([1, 2, 3], [1, 1, 2])
        study.tell(trial, cfg.lr * 100)
    assert variants == {"softmax", "linformer", "performer", "atrous_linear"}
    assert parses == [1], "the unpickled space parses its spec once, not per trial"
    assert space.__getstate__() == {"spec_dict": spec.to_dict()}  # pickled as plain data


def test_define_by_run_does_not_parse_the_spec_it_was_given(monkeypatch):
    from search_spaces.tune_space import DefineByRun

    spec = load_sweep("optuna_smoke").spec
    parses = count_parses(monkeypatch)
    space = DefineByRun(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        TrainConfig.from_dict(flatten_trial_config(space(study.ask())))
    assert parses == [0]


def test_optuna_searcher_gets_metric_and_mode():
    from search_spaces.tune_space import make_searcher

    searcher = make_searcher(load_sweep("optuna_smoke").spec)
    assert type(searcher).__name__ == "OptunaSearch"
    assert (searcher.metric, searcher.mode) == ("val/acc1", "max")
    config = searcher.suggest("trial_1")
    assert trial_label(config) in {"softmax", "linformer", "performer", "atrous_linear"}
    TrainConfig.from_dict(flatten_trial_config(config))


def test_topk_beyond_the_synthetic_class_count_is_rejected():
    with pytest.raises(ConfigError, match=r"k=5 is larger than the 4 classes"):
        load_sweep({"fixed": {**TINY, "data": "synthetic:classes=4,size=32,n=32,n_val=16"}})
    load_sweep({"fixed": {**TINY, "data": "synthetic:classes=4,size=32,n=32,n_val=16", "topk": [1, 3]}})
