"""vitsweep's Python API: run and resume sweeps, read their results as pandas DataFrames, rebuild
trained models.

    import vitsweep
    df = vitsweep.load_results("ray_results/smoke")          # one row per trial
    curves = vitsweep.load_results("ray_results/smoke", history=True)   # one row per trial and epoch
    model, sidecar = vitsweep.load_weight_dict(df.loc[0, "weights"])
    out, memory = vitsweep.track_memory(step)(batch)     # any function: its result plus peak memory
    out, flops = vitsweep.count_flops(forward)(batch)    # ... plus its FLOPs (torch.utils.flop_counter)

This package sits on top of the others (it imports `orchestrator`, `finetune`, ...); nothing in the
project imports it.
"""

from finetune import __version__
from finetune.models import build_vit
from finetune.profiling import count_flops, track_memory
from finetune.weights import load_weight_dict
from orchestrator.sweep import resume_sweep, run_sweep

from .results import load_results

__all__ = ["__version__", "build_vit", "count_flops", "load_results", "load_weight_dict", "resume_sweep", "run_sweep",
           "track_memory"]
