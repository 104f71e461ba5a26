"""TensorBoard helpers: scalars under the metric names `finetune.loop.fit` reports (``train/loss``,
``val/acc1``, ...), an HParams session per run, the HParams experiment config of a sweep, and a
sample-image grid. Non-finite and missing values are not logged.

HParams layout (TensorBoard's plugin protocol, written with `tensorboard.plugins.hparams.summary_v2`
primitives, no TensorFlow): each run writes ``session_start_info`` (its hyperparameter values) when it
starts and ``session_end_info`` (its status) when it ends, into its own directory; the metric values
of its row are the run's last ``val/acc1``, ``cost/gflops``, ... scalars, not copies under another tag.
A sweep's driver writes one ``experiment`` config at the experiment root (`write_hparams_config`),
which names every column: the hyperparameters of all variants and the metrics. Without one (a single
`vitsweep train` run), TensorBoard derives the columns from the sessions.
"""

from __future__ import annotations

import numbers
import os
import time
from numbers import Real
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

from torch.utils.tensorboard import SummaryWriter

from .io_utils import finite_or_none

HPARAMS_CONFIG_FILE = "events.out.tfevents.vitsweep-hparams"
# TrainConfig keys that describe how a run executes, not what it trains: never HParams columns.
RUNTIME_KEYS = ("num_workers", "device", "compile", "log_interval", "skip_bad_images", "attn")
# Kinds of HParams columns.
NUMBER, STRING, BOOL = "number", "string", "bool"


def _finite_number(value: Any) -> bool:
    return isinstance(finite_or_none(value), Real) and not isinstance(value, bool)


def hparam_value(value: Any) -> Union[bool, int, float, str, None]:
    """A config value as TensorBoard's HParams can hold it: bool, a number or str; sequences joined by
    commas (``dilation`` [1, 2, 3] -> ``"1,2,3"``); None and non-finite numbers are None (not logged)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Real):
        return int(value) if isinstance(value, numbers.Integral) else finite_or_none(float(value))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def flat_hparams(config: Mapping[str, Any]) -> Dict[str, Union[bool, float, str]]:
    """The hyperparameters of one run (a `TrainConfig.to_dict()`), flat: every key but `RUNTIME_KEYS`,
    the variant's own hyperparameters (``rank``, ``dilation``, ... with defaults filled in) as keys of
    their own, and ``label`` (``linformer k=64``). TensorBoard, MLflow and W&B all get this set."""
    from .models.attention import get_attention_class, variant_label

    variant = config.get("variant", "softmax")
    attn = get_attention_class(variant).resolve_hparams(config.get("attn") or {})
    flat = {k: v for k, v in config.items() if k not in RUNTIME_KEYS}
    flat.update(attn)
    flat["label"] = variant_label(variant, config.get("attn") or {})
    out = {k: hparam_value(v) for k, v in flat.items()}
    return {k: v for k, v in out.items() if v is not None}


def metric_names(topk: Iterable[int] = (1, 5), eval_at_start: bool = False) -> list:
    """Every scalar tag a run logs (`finetune.loop.fit`'s metrics), for an HParams experiment config."""
    names = ["train/loss", "val/loss", *(f"val/acc{k}" for k in topk), "lr", "throughput/train_img_s",
             "throughput/compute_img_s", "time/data_wait_frac", "throughput/eval_img_s", "throughput/mfu", "time/epoch_s", "cost/params", "cost/trainable_params",
             "cost/gflops", "cost/gmacs", "memory/peak_allocated_mb", "memory/peak_reserved_mb",
             "memory/peak_nvml_mb", "memory/attn_train_analytic_mb",
             # the inference profile of the last epoch (finetune.inference_profile.METRIC_KEYS, the numeric ones)
             "infer/latency_b1_ms", "infer/img_s", "infer/img_s_batch",
             *(f"infer/peak_mem_b{b}_mb" for b in (1, 32, 64, 128)), "infer/profile_s"]
    if eval_at_start:
        names += ["swap/loss", *(f"swap/acc{k}" for k in topk)]
    return names


def _summary(tag: str, plugin_data) -> Any:
    """A Summary holding HParams plugin data (as `summary_v2` builds its own)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary


def hparams_config_summary(columns: Mapping[str, Union[str, Sequence[Any]]], metrics: Sequence[str],
                           description: str = "") -> Any:
    """The HParams ``experiment`` summary: `columns` maps a hyperparameter to its kind (`NUMBER`,
    `STRING`, `BOOL`) or to its list of discrete values; `metrics` are scalar tags of the session runs."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

    types = {NUMBER: api_pb2.DATA_TYPE_FLOAT64, STRING: api_pb2.DATA_TYPE_STRING, BOOL: api_pb2.DATA_TYPE_BOOL}
    infos = []
    for name, kind in columns.items():
        info = api_pb2.HParamInfo(name=name)
        if isinstance(kind, str):
            info.type = types[kind]
        else:  # a discrete domain sets the type too
            summary_v2.Discrete(sorted({hparam_value(v) for v in kind} - {None})).update_hparam_info(info)
        infos.append(info)
    experiment = api_pb2.Experiment(
        description=description, time_created_secs=time.time(), hparam_infos=infos,
        metric_infos=[summary_v2.Metric(tag).as_proto() for tag in metrics],
    )
    return _summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def write_hparams_config(log_dir: Union[str, os.PathLike], columns: Mapping[str, Union[str, Sequence[Any]]],
                         metrics: Sequence[str], description: str = "") -> str:
    """Write the HParams experiment config as ``log_dir/HPARAMS_CONFIG_FILE`` (one fixed name, written
    atomically, so writing it again replaces it); returns the path."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(os.fspath(log_dir), HPARAMS_CONFIG_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    now = time.time()
    with open(tmp, "wb") as fh:
        records = RecordWriter(fh)
        records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        records.write(Event(wall_time=now, step=0,
                            summary=hparams_config_summary(columns, metrics, description)).SerializeToString())
    os.replace(tmp, path)
    return path


class TBWriter:
    """A thin wrapper over `SummaryWriter` with vitsweep's conventions."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Every finite numeric metric, under its own name (e.g. ``val/acc1``)."""
        for name, value in metrics.items():
            if _finite_number(value) and name != "epoch":
                self.writer.add_scalar(name, float(value), global_step=step)
        self.writer.flush()

    def figure(self, tag: str, figure, step: int = 0) -> None:
        self.writer.add_figure(tag, figure, global_step=step, close=True)
        self.writer.flush()

    def session_start(self, hparams: Mapping[str, Any], group: Optional[str] = None) -> None:
        """This run's HParams session: its hyperparameter values (`hparam_value` each). `group` names
        its row; runs that share a group are averaged into one row (default: this log directory)."""
        from tensorboard.plugins.hparams import summary_v2

        values = {k: hparam_value(v) for k, v in hparams.items()}
        values = {k: v for k, v in values.items() if v is not None}
        group = group or os.path.abspath(self.log_dir)
        self.writer.file_writer.add_summary(summary_v2.hparams_pb(values, trial_id=group))
        self.writer.flush()

    def session_end(self, status: str) -> None:
        """The session's end: ``finished`` is a success, ``diverged`` or an error a failure, anything
        else (stopped) unknown."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        code = {"finished": api_pb2.STATUS_SUCCESS, "diverged": api_pb2.STATUS_FAILURE,
                "errored": api_pb2.STATUS_FAILURE}.get(status, api_pb2.STATUS_UNKNOWN)
        info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
        self.writer.file_writer.add_summary(
            _summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TBWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
