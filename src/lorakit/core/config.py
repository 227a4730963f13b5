"""Config base class and the validation helpers every method's config uses.

A config holds hyperparameters only (scikit-learn style); data enters through explicit steps.
Each method's config is a dataclass subclass of :class:`AdapterConfig` that documents every
field and checks it in :meth:`AdapterConfig.validate`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from lorakit.core.errors import ConfigError


@dataclasses.dataclass
class AdapterConfig:
    """Base of every adapter config. Subclasses add their fields and extend `validate`.

    Every subclass declares `target_modules`: a list of module names or name suffixes
    (``["q_proj", "v_proj"]``), a regular expression matched against the full module path
    (``r".*\\.(q|v)_proj"``), or ``"all-linear"`` (every Linear layer except the output head).
    """

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # Bad values fail where they are written, not later inside inject; inject validates again
        # because fields may be changed after construction.
        self.validate()

    def validate(self) -> None:
        target_modules = getattr(self, "target_modules", None)
        if isinstance(target_modules, (list, tuple)):
            if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
                raise ConfigError(
                    f"target_modules={target_modules!r} must be a non-empty list of module names, "
                    "a regex string, or 'all-linear'"
                )
        elif isinstance(target_modules, str):
            if target_modules != "all-linear":
                try:
                    re.compile(target_modules)
                except re.error as err:
                    raise ConfigError(
                        f"target_modules={target_modules!r} is not a valid regular expression ({err}); "
                        "pass a list of names, a valid regex, or 'all-linear'"
                    ) from None
        else:
            raise ConfigError(
                f"target_modules={target_modules!r} must be a list of module names, a regex string, "
                "or 'all-linear'"
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data.get("target_modules"), tuple):
            data["target_modules"] = list(data["target_modules"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        reject_unknown_fields(cls, data)
        return cls(**data)


def reject_unknown_fields(config_cls: type, data: dict[str, Any]) -> None:
    """A mapping meant for a config dataclass may hold only its fields (typos fail loudly)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{config_cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")


def require_positive(name: str, value: float, integer: bool = False) -> None:
    kind = "integer" if integer else "number"
    if isinstance(value, bool) or (integer and not isinstance(value, int)) or not value > 0:
        raise ConfigError(f"{name}={value!r} is invalid: it must be a positive {kind} (> 0)")


def require_in_range(name: str, value: float, low: float, high: float, closed_high: bool = False) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if isinstance(value, bool) or not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{name}={value!r} is invalid: it must lie in [{low}, {high}{bracket}")


def require_choice(name: str, value: Any, allowed: list[Any] | tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Per-module override as PEFT resolves `rank_pattern`/`alpha_pattern`: the first key that
    matches the end of the module path (as a regex on whole path components) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
