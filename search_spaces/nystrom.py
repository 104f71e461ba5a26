"""Nystromformer: segment-mean landmarks and a Moore-Penrose pseudo-inverse; `landmarks` = m.

`landmarks >= tokens` falls back to exact attention (allowed, but it measures nothing new).
"""

VARIANT = "nystrom"


def block(landmarks=(32, 64)) -> dict:
    """Grid over the number of `landmarks` (one value: fixed)."""
    if len(landmarks) == 1:
        return {"variant": VARIANT, "fixed": {"landmarks": landmarks[0]}}
    return {"variant": VARIANT, "search": {"landmarks": {"grid": list(landmarks)}}}
