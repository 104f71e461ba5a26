"""Performer (FAVOR+): positive orthogonal random features of the softmax kernel; `features` = m.

The approximation error falls as m grows, the cost grows linearly in m.
"""

VARIANT = "performer"


def block(features=(64, 128)) -> dict:
    """Grid over the number of random `features` (one value: fixed)."""
    if len(features) == 1:
        return {"variant": VARIANT, "fixed": {"features": features[0]}}
    return {"variant": VARIANT, "search": {"features": {"grid": list(features)}}}
