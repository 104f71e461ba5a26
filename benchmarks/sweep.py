"""`vitsweep bench sweep`: what orchestration costs on top of the training inside it.

K identical fixed-work trials (same tiny ViT, same number of steps, different seeds) run through the
real `vitsweep run` path (`orchestrator.sweep.run_sweep`: spec validation, Tuner, trainable,
per-epoch checkpoints, report). Ideal wall time = sum of the trials' own time (Tune's
``time_total_s``) / concurrency; the ratio wall / ideal and the seconds of overhead per trial are what
the sweep machinery adds (process start, imports, scheduling, checkpoint upload, report).

With ``--floor`` each setting of ``reuse_actors`` is also measured with bare Ray Tune (a 1 s sleep
trainable, no torch), interleaved, on the same Ray instance: ``over_floor_s`` is vitsweep's overhead per
trial minus Ray's own. The JSON (``--out``) records the machine (CPU model, cores, versions) and the
load average before and after every row: the measurement is only as good as the machine was idle.
The first vitsweep sweep measured in the process also pays the driver's first imports (Tune, the
trackers, the report's scipy and matplotlib; several seconds), as a real ``vitsweep run`` does once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.output import check_bench_out, write_bench_json


def _spec(trials: int, concurrency: int, steps: int, reuse_actors: Optional[bool]) -> Dict[str, Any]:
    spec = {
        "name": "bench_sweep",
        "fixed": {
            "model": "vit_tiny_patch16_224", "pretrained": False, "pretrained_tag": None, "img_size": 32,
            "patch_size": 4, "depth": 2, "data": "synthetic:classes=4,size=32,n=256,n_val=64",
            "epochs": 1, "batch_size": 16, "max_train_batches": steps, "warmup_epochs": 0.0,
            "augment": "none", "num_workers": 0, "topk": [1],
        },
        "variants": ["softmax"],
        "seeds": list(range(trials)),
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": concurrency,
        "max_failures": 0,
    }
    spec["reuse_actors"] = reuse_actors  # None: the default rule (SweepSpec.actor_reuse)
    return spec


def _trial_times(exp_dir: Path) -> List[float]:
    times = []
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            times.append(float(lines[-1]["time_total_s"]))
    return times


def measure(trials: int, concurrency: int, steps: int, reuse_actors: bool, storage: Path) -> Dict[str, Any]:
    from orchestrator.sweep import run_sweep
    from search_spaces import SweepSpec

    spec = SweepSpec.from_dict(_spec(trials, concurrency, steps, reuse_actors), source="bench")
    name = f"bench-{int(time.time() * 1000)}"
    load_before = _loadavg()
    start = time.perf_counter()
    outcome = run_sweep(spec, storage=storage, name=name)
    wall = time.perf_counter() - start
    times = _trial_times(outcome.experiment_dir)
    if len(times) != trials:
        raise RuntimeError(f"expected {trials} finished trials, found {len(times)} in {outcome.experiment_dir}")
    ideal = sum(times) / concurrency
    return {
        "trials": trials, "concurrency": concurrency, "reuse_actors": spec.actor_reuse,
        "reuse_actors_setting": reuse_actors,
        "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
        "overhead_per_trial_s": (wall - ideal) * concurrency / trials,
        "median_trial_s": statistics.median(times),
        "load_before": load_before, "load_after": _loadavg(),
    }


def _marginal(row: Dict[str, Any], small: Dict[str, Any]) -> None:
    """Split `row`'s overhead (wall - ideal) into a once-per-sweep part and a per-trial part, from the
    same measurement with fewer trials (`small`): overhead = fixed + marginal x trials / concurrency."""
    extra = (row["wall_s"] - row["ideal_s"]) - (small["wall_s"] - small["ideal_s"])
    marginal = extra * row["concurrency"] / (row["trials"] - small["trials"])
    row["marginal_overhead_per_trial_s"] = marginal
    row["fixed_overhead_s"] = (row["wall_s"] - row["ideal_s"]) - marginal * row["trials"] / row["concurrency"]
    row["small"] = {k: small[k] for k in ("trials", "wall_s", "ideal_s", "ratio", "overhead_per_trial_s")}


def _loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, Any]:
    """What the numbers depend on: CPU model and cores, memory, Python/Ray/torch/timm versions."""
    import os
    import sys
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    versions = {}
    for dist in ("ray", "torch", "timm", "torchvision"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform(),
            "python": sys.version.split()[0], **versions}


def _sleep_trainable(config: Dict[str, Any]) -> None:
    """Ray Tune's floor: sleep 1 s, report one 1 kB checkpoint (no torch, no vitsweep)."""
    import os

    from ray import tune

    time.sleep(1.0)
    with tempfile.TemporaryDirectory() as d:
        Path(os.path.join(d, "payload")).write_text("x" * 1000)
        tune.report({"acc": 1.0}, checkpoint=tune.Checkpoint.from_directory(d))


def measure_floor(trials: int, concurrency: int, reuse_actors: bool, storage: Path) -> Dict[str, Any]:
    """The same measurement with a bare Ray Tune sweep of `_sleep_trainable`, with the loggers a
    vitsweep sweep has (Tune's JSON and CSV; `orchestrator.sweep.quiet_tune_output` turns Tune's
    automatic ones off in this process once a vitsweep sweep has run)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    load_before = _loadavg()
    start = time.perf_counter()
    results = tune.Tuner(
        tune.with_resources(_sleep_trainable, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, metric="acc", mode="max", max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(storage_path=str(storage), name=f"floor-{int(time.time() * 1000)}", verbose=0,
                                  callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]),
    ).fit()
    wall = time.perf_counter() - start
    ideal = sum(r.metrics["time_total_s"] for r in results) / concurrency
    return {"trials": trials, "concurrency": concurrency, "reuse_actors": reuse_actors, "what": "ray-floor",
            "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
            "overhead_per_trial_s": (wall - ideal) * concurrency / trials,
            "load_before": load_before, "load_after": _loadavg()}


def main(argv: Optional[List[str]] = None) -> int:
    import datetime as dt

    import ray

    p = argparse.ArgumentParser(prog="vitsweep bench sweep", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="training steps per trial (fixed work)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--reuse-actors", choices=("no", "yes", "both", "default"), default="both",
                   help="default: the sweep's own rule (reuse for CPU-only trials; SweepSpec.actor_reuse)")
    p.add_argument("--floor", action="store_true", help="also measure bare Ray Tune (a 1 s sleep trainable)")
    p.add_argument("--marginal-from", type=int, default=None, metavar="K0",
                   help="also run every row with K0 trials: the difference gives the overhead each further trial "
                        "adds (marginal_overhead_per_trial_s) apart from the once-per-sweep part (fixed_overhead_s: "
                        "validation, the first worker processes and their imports, the report)")
    p.add_argument("--out", default=None, help="write results as JSON")
    args = p.parse_args(argv)
    if args.out:
        args.out = str(check_bench_out(args.out))

    modes = {"no": [False], "yes": [True], "both": [False, True], "default": [None]}[args.reuse_actors]
    rows = []
    started = dt.datetime.now(dt.timezone.utc)
    ray.init(num_cpus=args.concurrency, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        with tempfile.TemporaryDirectory(prefix="vitsweep-bench-sweep-") as storage:
            for _ in range(args.repeats):
                for reuse in modes:  # interleaved
                    # The small run first: the driver's first-time imports (Tune, trackers, the report's
                    # scipy and matplotlib) then land in it, not in the difference the split is made from.
                    small = (measure(args.marginal_from, args.concurrency, args.steps, reuse, Path(storage))
                             if args.marginal_from else None)
                    row = {"what": "vitsweep", **measure(args.trials, args.concurrency, args.steps, reuse, Path(storage))}
                    if small is not None:
                        _marginal(row, small)
                    rows.append(row)
                    if args.floor:
                        floor = measure_floor(args.trials, args.concurrency, row["reuse_actors"], Path(storage))
                        row["over_floor_s"] = row["overhead_per_trial_s"] - floor["overhead_per_trial_s"]
                        if args.marginal_from:  # (Ray's floor imports nothing of vitsweep's)
                            _marginal(floor, measure_floor(args.marginal_from, args.concurrency, row["reuse_actors"],
                                                           Path(storage)))
                            row["marginal_over_floor_s"] = (row["marginal_overhead_per_trial_s"]
                                                            - floor["marginal_overhead_per_trial_s"])
                        rows.append(floor)
    finally:
        ray.shutdown()
    finished = dt.datetime.now(dt.timezone.utc)
    if args.marginal_from:
        print(f"{'what':>9} {'reuse_actors':>12} {'fixed s':>8} {'marginal s/trial':>16} {'marginal over floor s':>21}")
        for r in rows:
            over = f"{r['marginal_over_floor_s']:>21.2f}" if "marginal_over_floor_s" in r else f"{'':>21}"
            print(f"{r['what']:>9} {str(r['reuse_actors']):>12} {r['fixed_overhead_s']:>8.1f} "
                  f"{r['marginal_overhead_per_trial_s']:>16.2f} {over}")
    print(f"{'what':>9} {'reuse_actors':>12} {'trials':>6} {'conc':>4} {'wall s':>8} {'ideal s':>8} {'ratio':>6} "
          f"{'overhead s/trial':>16} {'over floor s':>12} {'load 1m':>8}")
    for r in rows:
        over = f"{r['over_floor_s']:>12.2f}" if "over_floor_s" in r else f"{'':>12}"
        load = r["load_before"][0] if r.get("load_before") else float("nan")
        print(f"{r['what']:>9} {str(r['reuse_actors']):>12} {r['trials']:>6} {r['concurrency']:>4} {r['wall_s']:>8.1f} "
              f"{r['ideal_s']:>8.1f} {r['ratio']:>6.2f} {r['overhead_per_trial_s']:>16.2f} {over} {load:>8.2f}")
    if args.out:
        info = {"rows": rows, "machine": machine_info(), "args": vars(args),
                "started_utc": started.isoformat(timespec="seconds"), "finished_utc": finished.isoformat(timespec="seconds")}
        write_bench_json(args.out, json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
