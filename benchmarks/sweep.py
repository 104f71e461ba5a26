"""`vitsweep bench sweep`: what orchestration costs on top of the training inside it.

K identical fixed-work trials (same tiny ViT, same number of steps, different seeds) run through the
real `vitsweep run` path (`orchestrator.sweep.run_sweep`: spec validation, Tuner, trainable,
per-epoch checkpoints, report). Ideal wall time = sum of the trials' own time (Tune's
``time_total_s``) / concurrency; the ratio wall / ideal and the seconds of overhead per trial are what
the sweep machinery adds (process start, imports, scheduling, checkpoint upload, report).
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


def _spec(trials: int, concurrency: int, steps: int, reuse_actors: bool) -> Dict[str, Any]:
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
    if reuse_actors:
        spec["reuse_actors"] = True
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
    start = time.perf_counter()
    outcome = run_sweep(spec, storage=storage, name=name)
    wall = time.perf_counter() - start
    times = _trial_times(outcome.experiment_dir)
    if len(times) != trials:
        raise RuntimeError(f"expected {trials} finished trials, found {len(times)} in {outcome.experiment_dir}")
    ideal = sum(times) / concurrency
    return {
        "trials": trials, "concurrency": concurrency, "reuse_actors": reuse_actors,
        "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
        "overhead_per_trial_s": (wall - ideal) * concurrency / trials,
        "median_trial_s": statistics.median(times),
    }


def _sleep_trainable(config: Dict[str, Any]) -> None:
    """Ray Tune's floor: sleep 1 s, report one 1 kB checkpoint (no torch, no vitsweep)."""
    import os

    from ray import tune

    time.sleep(1.0)
    with tempfile.TemporaryDirectory() as d:
        Path(os.path.join(d, "payload")).write_text("x" * 1000)
        tune.report({"acc": 1.0}, checkpoint=tune.Checkpoint.from_directory(d))


def measure_floor(trials: int, concurrency: int, reuse_actors: bool, storage: Path) -> Dict[str, Any]:
    """The same measurement with a bare Ray Tune sweep of `_sleep_trainable`."""
    from ray import tune

    start = time.perf_counter()
    results = tune.Tuner(
        tune.with_resources(_sleep_trainable, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, metric="acc", mode="max", max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(storage_path=str(storage), name=f"floor-{int(time.time() * 1000)}", verbose=0),
    ).fit()
    wall = time.perf_counter() - start
    ideal = sum(r.metrics["time_total_s"] for r in results) / concurrency
    return {"trials": trials, "concurrency": concurrency, "reuse_actors": reuse_actors, "what": "ray-floor",
            "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
            "overhead_per_trial_s": (wall - ideal) * concurrency / trials}


def main(argv: Optional[List[str]] = None) -> int:
    import ray

    p = argparse.ArgumentParser(prog="vitsweep bench sweep", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="training steps per trial (fixed work)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--reuse-actors", choices=("no", "yes", "both"), default="both")
    p.add_argument("--floor", action="store_true", help="also measure bare Ray Tune (a 1 s sleep trainable)")
    p.add_argument("--out", default=None, help="write results as JSON")
    args = p.parse_args(argv)

    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.reuse_actors]
    rows = []
    ray.init(num_cpus=args.concurrency, include_dashboard=False, object_store_memory=100 * 2**20)
    try:
        with tempfile.TemporaryDirectory(prefix="vitsweep-bench-sweep-") as storage:
            for _ in range(args.repeats):
                for reuse in modes:  # interleaved
                    rows.append({"what": "vitsweep", **measure(args.trials, args.concurrency, args.steps, reuse, Path(storage))})
                    if args.floor:
                        rows.append(measure_floor(args.trials, args.concurrency, reuse, Path(storage)))
    finally:
        ray.shutdown()
    print(f"{'what':>9} {'reuse_actors':>12} {'trials':>6} {'conc':>4} {'wall s':>8} {'ideal s':>8} {'ratio':>6} {'overhead s/trial':>16}")
    for r in rows:
        print(f"{r['what']:>9} {str(r['reuse_actors']):>12} {r['trials']:>6} {r['concurrency']:>4} {r['wall_s']:>8.1f} "
              f"{r['ideal_s']:>8.1f} {r['ratio']:>6.2f} {r['overhead_per_trial_s']:>16.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "machine": platform.processor() or platform.machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
