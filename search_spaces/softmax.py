"""Exact softmax attention (the baseline): no hyperparameters of its own."""

VARIANT = "softmax"


def block() -> dict:
    """The baseline variant block."""
    return {"variant": VARIANT}
