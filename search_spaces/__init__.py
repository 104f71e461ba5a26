"""Search spaces: one module per attention variant, the shared optimiser space, and presets that
combine them (`search_spaces.presets`). A sweep is data (`SweepSpec`), validated before Ray starts
(`validate_spec`) and turned into Tune's terms in `search_spaces.tune_space`.
"""

from .domains import DOMAIN_KINDS, Domain
from .presets import get_preset, load_config_file, preset_names
from .spec import SweepSpec, VariantBlock
from .validate import count_trials, validate_resources, validate_spec

__all__ = [
    "DOMAIN_KINDS",
    "Domain",
    "SweepSpec",
    "VariantBlock",
    "count_trials",
    "get_preset",
    "load_config_file",
    "preset_names",
    "validate_resources",
    "validate_spec",
]
