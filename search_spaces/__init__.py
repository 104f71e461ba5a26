"""Search spaces: one module per attention variant, the shared optimiser space, and presets that
combine them (`search_spaces.presets`). A sweep is data (`SweepSpec`); `load_sweep` reads, parses and
validates it once before Ray starts and returns the `ResolvedSweep` the driver runs, which
`search_spaces.tune_space` turns into Tune's terms.
"""

from .domains import DOMAIN_KINDS, Domain
from .presets import preset_names
from .resolve import ResolvedSweep, SweepOverrides, count_trials, load_sweep
from .spec import SweepSpec, VariantBlock
from .validate import validate_resources

__all__ = [
    "DOMAIN_KINDS",
    "Domain",
    "ResolvedSweep",
    "SweepOverrides",
    "SweepSpec",
    "VariantBlock",
    "count_trials",
    "load_sweep",
    "preset_names",
    "validate_resources",
]
