"""Linformer: keys and values projected along the sequence axis to `rank` rows.

`rank` must stay below the token count (1 + Hp * Wp), otherwise nothing is compressed; the validator
checks every value against the sweep's geometry before Ray starts.
"""

VARIANT = "linformer"


def block(ranks=(32, 64), share_kv: bool = False) -> dict:
    """Grid over `ranks` (one value: fixed)."""
    fixed = {"share_kv": share_kv}
    if len(ranks) == 1:
        return {"variant": VARIANT, "fixed": {**fixed, "rank": ranks[0]}}
    return {"variant": VARIANT, "fixed": fixed, "search": {"rank": {"grid": list(ranks)}}}
