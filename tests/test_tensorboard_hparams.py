"""TensorBoard's HParams dashboard of a sweep, read back through TensorBoard's own data provider and
hparams plugin (not only the event files): one row per trial, a column for every swept hyperparameter
of every variant, and the final metrics as values, taken from the runs' own scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import TINY_SWEEP_FIXED
from finetune.config import TrainConfig
from finetune.models.attention import get_attention_class
from finetune.tb_writer import HPARAMS_CONFIG_FILE, write_hparams_config
from finetune.train import run_training
from search_spaces import load_sweep

ALL_STATUSES = ("STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING")


def read_hparams(logdir: Path) -> Tuple[object, List[object], Dict[str, List[str]]]:
    """(the experiment, the session groups, {run: scalar tags}) as TensorBoard's HParams dashboard gets
    them: an EventMultiplexer, the MultiplexerDataProvider and the plugin's own handlers."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    ctx = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider))
    request_ctx = context.RequestContext()
    metadata = ctx.hparams_metadata(request_ctx, "")
    experiment = ctx.experiment_from_metadata(request_ctx, "", True, metadata,
                                              ctx.hparams_from_data_provider(request_ctx, "", limit=None))
    request = api_pb2.ListSessionGroupsRequest(
        allowed_statuses=[api_pb2.Status.Value(s) for s in ALL_STATUSES], start_index=0, slice_size=1000)
    groups = list(list_session_groups.Handler(request_ctx, ctx, "", request).run().session_groups)
    scalars = {run: sorted(mux.PluginRunToTagToContent("scalars").get(run, {})) for run in mux.Runs()}
    return experiment, groups, scalars


def _value(v):
    kind = v.WhichOneof("kind")
    return getattr(v, kind)


@pytest.fixture(scope="module")
def sweep_logdir(tmp_path_factory):
    """Two runs of a two-variant sweep (softmax; linformer with rank searched), written as a sweep's
    trials write them, plus the driver's experiment config at the root."""
    root = tmp_path_factory.mktemp("exp")
    resolved = load_sweep({
        "fixed": {**TINY_SWEEP_FIXED, "depth": 2, "epochs": 1, "batch_size": 10, "augment": "none", "num_workers": 0,
                  "topk": [1, 2]},
        "search": {"lr": {"grid": [1e-3]}},
        "variants": ["softmax", {"variant": "linformer", "search": {"rank": {"grid": [8]}}}],
    })
    from orchestrator.trackers import hparam_columns, sweep_metric_names

    write_hparams_config(root, hparam_columns(resolved), sweep_metric_names(resolved), "test sweep")
    for name, variant in (("softmax_seed0_t0", {"variant": "softmax"}),
                          ("linformer_k=8_seed0_t1", {"variant": "linformer", "rank": 8})):
        cfg = TrainConfig.from_dict({**resolved.checked_configs[0].to_dict(), "attn": {}, **variant})
        run_training(cfg, root / name / "run", progress=False, local_checkpoints=False)
    return root, resolved


def test_one_row_per_trial_with_every_column_and_the_final_metrics(sweep_logdir):
    root, resolved = sweep_logdir
    experiment, groups, scalars = read_hparams(root)

    columns = {h.name for h in experiment.hparam_infos}
    declared = set(get_attention_class("linformer").hparams)  # rank, share_kv (softmax declares none)
    assert {"label", "variant", "seed", "lr"} | declared <= columns
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"val/acc1", "val/acc2", "train/loss", "cost/gflops", "cost/params", "memory/peak_allocated_mb"} <= metrics
    assert experiment.description == "test sweep"

    assert len(groups) == 2  # one row per trial
    by_variant = {_value(g.hparams["variant"]): g for g in groups}
    assert set(by_variant) == {"softmax", "linformer"}
    lin = by_variant["linformer"]
    assert _value(lin.hparams["rank"]) == 8 and _value(lin.hparams["share_kv"]) is False
    assert _value(lin.hparams["label"]) == "linformer k=8" and _value(lin.hparams["lr"]) == pytest.approx(1e-3)
    for group in groups:
        (session,) = group.sessions
        assert session.status == 1  # STATUS_SUCCESS: the run ended "finished"
        values = {m.name.tag: m.value for m in group.metric_values}
        # every metric the run logged is a value of its row, read from the run's own scalars
        logged = set(scalars[session.name]) - {"samples/val"}
        assert logged <= metrics, logged - metrics
        assert logged == set(values), logged ^ set(values)
        assert 0.0 <= values["val/acc1"] <= 1.0 and values["cost/gflops"] > 0

    # no duplicate metric copies, one run per trial besides the root config
    assert not [t for tags in scalars.values() for t in tags if t.startswith("hparam/")]
    assert sorted(scalars) == [".", "linformer_k=8_seed0_t1/run/tb", "softmax_seed0_t0/run/tb"]
    assert (root / HPARAMS_CONFIG_FILE).is_file()


def test_the_config_file_is_replaced_not_duplicated(tmp_path):
    write_hparams_config(tmp_path, {"lr": "number"}, ["val/acc1"])
    write_hparams_config(tmp_path, {"lr": "number", "rank": "number"}, ["val/acc1"])
    assert [p.name for p in tmp_path.iterdir()] == [HPARAMS_CONFIG_FILE]
    experiment, groups, _ = read_hparams(tmp_path)
    assert [h.name for h in experiment.hparam_infos] == ["lr", "rank"] and groups == []


def test_a_single_train_run_gets_a_session_tensorboard_can_list(tmp_path, tiny_config):
    """`vitsweep train` writes no experiment config: TensorBoard derives the columns from the session."""
    run_training(TrainConfig.from_dict({**tiny_config, "epochs": 1, "variant": "nystrom", "landmarks": 8}),
                 tmp_path / "run", progress=False, local_checkpoints=False)
    experiment, groups, _ = read_hparams(tmp_path)
    (group,) = groups
    assert _value(group.hparams["landmarks"]) == 8 and _value(group.hparams["variant"]) == "nystrom"
    assert "val/acc1" in {m.name.tag for m in group.metric_values}
    assert {"landmarks", "lr", "seed"} <= {h.name for h in experiment.hparam_infos}
