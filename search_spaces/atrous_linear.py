"""Hybrid atrous-linear attention (ours): exact attention over a dilated `window x window`
neighbourhood per head group (one group per rate in `dilation`), FAVOR+ `features` for the rest.

A dilation set must fit the patch grid (`(window - 1) * rate < grid side`) and split the heads into
groups; the validator checks each set against the sweep's geometry before Ray starts.
"""

VARIANT = "atrous_linear"


def block(dilations=((1, 2, 3),), window: int = 3, features: int = 64) -> dict:
    """Grid over dilation sets (one set: fixed); `window` and `features` fixed."""
    fixed = {"window": window, "features": features}
    if len(dilations) == 1:
        return {"variant": VARIANT, "fixed": {**fixed, "dilation": list(dilations[0])}}
    return {"variant": VARIANT, "fixed": fixed, "search": {"dilation": {"grid": [list(d) for d in dilations]}}}
