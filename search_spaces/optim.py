"""The optimiser space shared by every variant (AdamW via timm, warmup + cosine)."""


def space(lr=(1e-4, 3e-3), weight_decay=(0.0, 0.05), warmup_epochs=(0.0, 1.0)) -> dict:
    """Random/Optuna space: log-uniform `lr`, a choice of `weight_decay` and `warmup_epochs`."""
    return {
        "lr": {"loguniform": list(lr)},
        "weight_decay": {"choice": list(weight_decay)},
        "warmup_epochs": {"choice": list(warmup_epochs)},
    }


def grid(lr=(3e-4, 1e-3)) -> dict:
    """Grid space: a few learning rates, so that seeds of one configuration group together."""
    return {"lr": {"grid": list(lr)}}
