"""Declarative search domains: the one shape that presets, YAML files and the validator share.

A value in a sweep's ``search:`` mapping is either a constant or a one-key mapping naming a domain::

    {grid: [a, b, c]}          every value is run (Tune's grid_search; categorical for Optuna)
    {choice: [a, b, c]}        one value sampled per trial
    {uniform: [low, high]}     float in [low, high]
    {loguniform: [low, high]}  float in [low, high], log-uniform (low > 0)
    {randint: [low, high]}     integer in [low, high], both ends included

`Domain` turns one of those into a Tune domain (`to_tune`), an Optuna suggestion (`suggest`) and the
extreme values the validator checks against a model's geometry (`extremes`). Nothing here imports Ray
at module level, so validating a sweep never starts or even loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Tuple

from finetune.config import ConfigError

DOMAIN_KINDS: Tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")
_RANGE_KINDS = ("uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Domain:
    """One searchable key: `kind` is one of `DOMAIN_KINDS`; `args` the values or the (low, high) pair."""

    key: str
    kind: str
    args: Tuple[Any, ...]

    @classmethod
    def parse(cls, key: str, spec: Mapping[str, Any]) -> "Domain":
        """Parse ``{kind: args}``; every error names the key, the spec and what is allowed."""
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(
                f"search[{key!r}]={spec!r}: a domain is a one-key mapping, one of "
                + ", ".join(f"{{{k}: ...}}" for k in DOMAIN_KINDS)
            )
        (kind, args), = spec.items()
        if kind not in DOMAIN_KINDS:
            import difflib

            close = difflib.get_close_matches(str(kind), DOMAIN_KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"search[{key!r}]: unknown domain {kind!r}{hint}; allowed: {', '.join(DOMAIN_KINDS)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"search[{key!r}]={{{kind}: {args!r}}} needs a non-empty list")
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
        if kind in _RANGE_KINDS:
            if len(args) != 2:
                raise ConfigError(f"search[{key!r}]={{{kind}: {list(args)!r}}} needs exactly [low, high]")
            low, high = args
            numeric = (int,) if kind == "randint" else (int, float)
            if any(isinstance(v, bool) or not isinstance(v, numeric) for v in args):
                what = "integers" if kind == "randint" else "numbers"
                raise ConfigError(f"search[{key!r}]={{{kind}: {list(args)!r}}}: low and high must be {what}")
            if not low < high:
                raise ConfigError(
                    f"search[{key!r}]={{{kind}: {list(args)!r}}}: bounds are reversed or equal "
                    f"(low={low} must be < high={high})"
                )
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"search[{key!r}]={{loguniform: {list(args)!r}}}: low={low} must be > 0")
        return cls(key=key, kind=kind, args=args)

    def to_spec(self) -> dict:
        """Back to the YAML/JSON shape (tuples as lists)."""
        return {self.kind: [list(a) if isinstance(a, tuple) else a for a in self.args]}

    def extremes(self) -> List[Any]:
        """Values the validator must accept: every listed value, or both ends of a range."""
        return list(self.args)

    def to_tune(self):
        """The equivalent `ray.tune` domain."""
        from ray import tune

        values = [list(a) if isinstance(a, tuple) else a for a in self.args]
        if self.kind == "grid":
            return tune.grid_search(values)
        if self.kind == "choice":
            return tune.choice(values)
        if self.kind == "uniform":
            return tune.uniform(*values)
        if self.kind == "loguniform":
            return tune.loguniform(*values)
        return tune.randint(values[0], values[1] + 1)  # Tune's upper bound is exclusive

    def suggest(self, trial, name: str) -> Any:
        """Ask an Optuna trial (or Ray's define-by-run captor) for a value under `name`."""
        if self.kind in ("grid", "choice"):
            # Optuna's categorical needs hashable primitives: lists (dilation sets) travel as their index.
            if all(isinstance(a, (int, float, str, bool)) or a is None for a in self.args):
                return trial.suggest_categorical(name, list(self.args))
            index = trial.suggest_categorical(name + "#index", list(range(len(self.args))))
            value = self.args[index]
            return list(value) if isinstance(value, tuple) else value
        if self.kind == "uniform":
            return trial.suggest_float(name, self.args[0], self.args[1])
        if self.kind == "loguniform":
            return trial.suggest_float(name, self.args[0], self.args[1], log=True)
        return trial.suggest_int(name, self.args[0], self.args[1])

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"
