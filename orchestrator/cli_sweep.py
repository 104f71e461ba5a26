"""``vitsweep run | resume | report | submit``: the sweep subcommands.

`orchestrator.cli` (the ``vitsweep`` entry point) calls `add_sweep_commands(subparsers)`; each
subcommand sets ``func(args) -> exit code`` (0 ok, 1 some trials errored, 2 bad input). Bad input is
reported before Ray starts, naming the value. ``python -m orchestrator.cli_sweep ...`` runs the same
commands without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from finetune.errors import ConfigError, VitsweepError
from finetune.yaml_io import parse_yaml
from search_spaces import SweepOverrides

from .interrupts import StopRequest, resume_hint
from .preflight import check_cluster_address, check_name
from .report import build_storage_report
from .tables import console_table
from .storage import resolve_storage
from .submit import add_submit_arguments, submit
from .sweep import DEFAULT_STORAGE, check_export_port, load_cluster_sweep, load_run_sweep, resume_sweep, run_sweep


def _parse_set(values: Optional[List[str]]) -> Dict[str, Any]:
    fixed: Dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (VALUE in YAML, e.g. epochs=2, dilation=[1,2])")
        fixed[key.strip()] = parse_yaml(raw, f"--set {key.strip()}")  # no aliases, bounded nesting
    return fixed


def _print_where(uri: str, local_dir: Path, report, uploaded) -> None:
    """Where the experiment and its report are, and how to look at them."""
    print(f"experiment: {uri}")
    if uploaded is None:  # built in place
        print(f"report:     {report.markdown_path}  {report.csv_path}  {report.markdown_path.with_suffix('.html')}  "
              f"{report.directory / 'plots'}")
    else:
        where = "uploaded to the experiment" if uploaded is True else str(uploaded)
        print(f"report:     comparison.md, comparison.csv, comparison.html, plots/ ({where})")
        print(f"local copy: {local_dir} (tables, plots, results, TensorBoard events; no checkpoints)")
    print(f"tensorboard --logdir {local_dir} --host 127.0.0.1")


def _print_outcome(outcome) -> int:
    report = outcome.report
    print()
    print(console_table(report.rows))
    errored = [r for r in report.records if r.error]
    for record in errored[:10]:  # why, in full: the table has room for "errored" only
        print(f"error: {record.label} ({record.trial_id}): {record.error}")
    if len(errored) > 10:
        print(f"error: ... and {len(errored) - 10} more (comparison.md, section Errors)")
    print()
    uploaded = None if outcome.experiment.is_local else True
    _print_where(outcome.experiment.uri, outcome.experiment_dir, report, uploaded)
    if outcome.missing_trials:
        print(f"warning: {outcome.missing_trials} grid trial(s) were never created (see the log above)")
    if outcome.interrupted_by:
        stop = StopRequest(outcome.interrupted_by)
        print(resume_hint(outcome.experiment.uri, stop), file=sys.stderr)
        return stop.exit_code
    return 1 if outcome.num_errors or outcome.missing_trials else 0


def run_overrides(args: argparse.Namespace) -> SweepOverrides:
    """The sweep options of `vitsweep run`'s flags."""
    return SweepOverrides(
        num_samples=args.num_samples,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        workers_per_trial=args.workers_per_trial,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        searcher=args.searcher,
        max_failures=args.max_failures,
        fixed=_parse_set(args.set),
        data_cache_dir=args.data_cache,
    )


def run_source(args: argparse.Namespace):
    return args.preset if args.preset is not None else Path(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    storage = resolve_storage(args.storage)  # the syntax first: no I/O
    if args.name is not None:
        check_name(args.name)  # cheap checks before the sweep's validation
    check_export_port(args.metrics_export_port, args.address)
    check_cluster_address(args.address)
    resolved = load_run_sweep(run_source(args), run_overrides(args), address=args.address,
                              num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    outcome = run_sweep(
        resolved, storage=storage, name=args.name, address=args.address, num_cpus=args.num_cpus,
        num_gpus=args.num_gpus, overwrite=args.overwrite, loggers=args.log or (),
        metrics_export_port=args.metrics_export_port,
    )
    return _print_outcome(outcome)


def cmd_resume(args: argparse.Namespace) -> int:
    outcome = resume_sweep(args.experiment, address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                           metrics_export_port=args.metrics_export_port)
    return _print_outcome(outcome)


def cmd_report(args: argparse.Namespace) -> int:
    built = build_storage_report(resolve_storage(args.experiment), args.out)
    print(console_table(built.report.rows))
    print()
    _print_where(built.experiment.uri, built.local_dir, built.report, built.uploaded)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    if args.run[:1] == ["--"]:
        args.run = args.run[1:]
    run_args = add_run_arguments(argparse.ArgumentParser(
        prog="vitsweep submit ... --", description="the options of `vitsweep run` for the job")).parse_args(args.run)
    return submit(args, load=lambda: load_cluster_sweep(run_source(run_args), run_overrides(run_args)))


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except VitsweepError as err:
            print(f"vitsweep {args.command}: error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # the disk, not vitsweep: full, read-only, quota, permissions
            from finetune.outputs import disk_error_message

            message = disk_error_message(err)
            if message is None:
                raise
            print(f"vitsweep {args.command}: error: {message}", file=sys.stderr)
            return 2

    return run


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _local_resource_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="join a running Ray cluster (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=_positive_float, help="CPUs of the local instance (default: all)")
    parser.add_argument("--num-gpus", type=_positive_float,
                        help="GPUs of the local instance (default: CUDA devices torch sees)")
    parser.add_argument("--metrics-export-port", metavar="PORT",
                        help="the local instance exports Ray's and the trials' metrics (ray_vitsweep_*) in "
                             "Prometheus format on http://127.0.0.1:PORT/metrics (1024-65535, free); a cluster: "
                             "`ray start --metrics-export-port PORT` on each node. See docs/dashboard.md")


def add_run_arguments(run: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`vitsweep run`'s options on `run` (also what `vitsweep submit` passes on to the job)."""
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset from search_spaces.presets (smoke, imagenet100, scaling, ...)")
    source.add_argument("--config", help="a sweep YAML file (schema: search_spaces/spec.py)")
    run.add_argument("--storage", default=DEFAULT_STORAGE,
                     help="results root: a directory (default ./ray_results, made absolute; on a cluster a shared/NFS "
                          "path every node mounts) or a URI: s3://bucket/prefix[?endpoint_override=host:port&"
                          "scheme=http], gs://bucket/prefix")
    run.add_argument("--name", help="experiment name (default <preset>-<timestamp>); an existing experiment is "
                                    "refused: continue it with `vitsweep resume`, or see --overwrite")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh where STORAGE/NAME exists: it is first moved aside to NAME.old-<time> "
                          "(local storage only; never while a driver runs it)")
    run.add_argument("--num-samples", type=int, help="grid/random: repeats of the space; optuna: trials")
    run.add_argument("--gpus-per-trial", type=_positive_float,
                     help="GPUs per trial (per worker with --workers-per-trial); fractions share a GPU (0.5); above 1 "
                          "is refused: use --workers-per-trial N --gpus-per-trial 1")
    run.add_argument("--cpus-per-trial", type=_positive_float, help="CPUs per trial (per worker with --workers-per-trial)")
    run.add_argument("--workers-per-trial", type=int,
                     help="data-parallel workers per trial (default 1): each trial trains with DDP through Ray Train's "
                          "TorchTrainer on N workers, batch_size is the global batch (docs/distributed.md)")
    run.add_argument("--max-concurrent", type=int,
                     help="at most this many trials at once (grid/random then create trials lazily: a driver "
                          "killed mid-sweep may lose trials not yet created; limit by --cpus-per-trial instead)")
    run.add_argument("--scheduler", choices=("fifo", "asha"), help="trial scheduler (ASHA stops weak trials early)")
    run.add_argument("--searcher", choices=("grid", "random", "optuna"), help="search algorithm")
    run.add_argument("--max-failures", type=int, help="retries of a failed trial from its last checkpoint")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a fixed TrainConfig value (repeatable; VALUE in YAML), e.g. --set epochs=1")
    run.add_argument("--log", action="append", metavar="TRACKER",
                     help="also log every trial to mlflow and/or wandb (repeatable or comma-separated; TensorBoard "
                          "is always written): the same hyperparameters and metric names as TensorBoard. MLflow "
                          "uses MLFLOW_TRACKING_URI, W&B WANDB_PROJECT (default vitsweep) and WANDB_MODE=offline")
    run.add_argument("--data-cache", metavar="DIR|off",
                     help="where the sweep's decode-once cache of its data lives (sweeps with data_cache: the "
                          "imagenet100 and scaling presets; built once by the driver before any trial, then reused). "
                          "Default: $VITSWEEP_DATA_CACHE or ~/.cache/vitsweep/data; on a cluster a path every node "
                          "mounts is required. off: every trial reads the source itself (decodes JPEGs)")
    _local_resource_flags(run)
    return run


def add_sweep_commands(subparsers) -> None:
    """Register ``run``, ``resume``, ``report`` and ``submit`` on an argparse subparsers object."""
    run = subparsers.add_parser("run", help="run a sweep with Ray Tune", description=run_help())
    add_run_arguments(run)
    run.set_defaults(func=_guarded(cmd_run))

    resume = subparsers.add_parser("resume", help="continue a stopped sweep from its trials' checkpoints")
    resume.add_argument("experiment", help="the experiment: STORAGE/NAME, a directory or a URI (s3://bucket/prefix/NAME)")
    _local_resource_flags(resume)
    resume.set_defaults(func=_guarded(cmd_resume))

    report = subparsers.add_parser(
        "report", help="rebuild comparison.md/.csv/.html and plots of an experiment, from a directory or a URI",
        description="Rebuild the comparison table and plots from what the experiment holds, on any machine that "
                    "can read it. A URI's small files (tables, plots, results, TensorBoard events; no "
                    "checkpoints) are copied to --out (default: a new temp directory), the report is built "
                    "there and uploaded back when the storage accepts writes.")
    report.add_argument("experiment", help="the experiment: STORAGE/NAME, a directory or a URI (s3://bucket/prefix/NAME)")
    report.add_argument("--out", metavar="DIR",
                        help="local directory for the copy and the report (a URI: default a new temp directory; "
                             "a directory: default in place)")
    report.set_defaults(func=_guarded(cmd_report))

    sub = subparsers.add_parser(
        "submit", help="run a sweep as a Ray job on a cluster; results in shared or cloud storage",
        description="Validate the sweep here, then submit `vitsweep run ... --storage STORAGE --name NAME` to "
                    "the cluster's job server. Everything after `--` is passed to `vitsweep run`.")
    add_submit_arguments(sub)
    sub.set_defaults(func=_guarded(cmd_submit))


def run_help() -> str:
    return ("Validate the sweep (every fixed value, both ends of every range) before Ray starts, then run it "
            "with Ray Tune and write comparison.md, comparison.csv, comparison.html and plots/ into the experiment directory.")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vitsweep", description="vitsweep sweep commands")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sweep_commands(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
