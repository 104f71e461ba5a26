"""vitsweep's fine-tuning core: data, models, the training loop, metrics and weights.

Nothing under this package imports Ray: GPU machines without Ray use it directly.
"""

__version__ = "0.1.0"
