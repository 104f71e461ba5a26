"""Command-line flags derived from the registered variants' `HParam` declarations.

One flag per hyperparameter name (``rank`` -> ``--rank``); a name several variants declare is one flag
whose help names each. Types follow the declaration: ints and floats typed, bools as
``--x/--no-x``, choices as argparse choices, sequences as ``nargs=+``. Defaults are suppressed, so
only what the user typed reaches the config and unset values stay the variant's defaults.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

from .registry import declared_hparams


def add_hparam_arguments(group) -> None:
    """Add every registered variant's hyperparameter flags to an argparse parser or group."""
    for name, owners in declared_hparams().items():
        hp = owners[0][1]
        helps = "; ".join(f"{variant}: {h.help}" for variant, h in owners)
        if len({_default_text(h.default) for _, h in owners}) == 1:
            defaults = _default_text(hp.default)
        else:
            defaults = ", ".join(f"{variant} {_default_text(h.default)}" for variant, h in owners)
        kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name, "help": f"{helps} (default {defaults})"}
        if hp.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = hp.type
            if all(h.choices is not None for _, h in owners):
                kwargs["choices"] = tuple(dict.fromkeys(c for _, h in owners for c in h.choices))
            if hp.sequence:
                kwargs["nargs"] = "+"
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def _default_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "off" if value is None else str(value)
