"""Config base class and the validation helpers every method's config uses.

A config holds hyperparameters only (scikit-learn style); data enters through explicit steps.
Each method's config is a dataclass subclass of :class:`AdapterConfig` that documents every
field and checks it in :meth:`AdapterConfig.validate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, ClassVar

from lorakit.core.errors import ConfigError
from lorakit.core.patterns import check_pattern_keys, check_target_regex, pattern_value

__all__ = ["AdapterConfig", "pattern_value", "reject_unknown_fields", "require_choice", "require_in_range",
           "require_positive"]


@dataclasses.dataclass
class AdapterConfig:
    """Base of every adapter config. Subclasses add their fields and extend `validate`.

    Every subclass declares `target_modules`: a list of module names or name suffixes
    (``["q_proj", "v_proj"]``), a regular expression matched against the full module path
    (``r".*\\.(q|v)_proj"``, RE2 syntax: see `lorakit.core.patterns`), or ``"all-linear"``
    (every Linear layer except the output head).

    Every field must hold a value of its annotated type (``int`` fields an integer, ``float``
    fields a finite number, ``dict[str, int]`` a mapping of strings to integers, ...), so a config
    built from a file or a flag fails here, naming the field, instead of deep inside a method.
    """

    method: ClassVar[str] = ""
    # Fields whose keys are module-name regexes (PEFT's rank_pattern / alpha_pattern semantics).
    regex_keyed_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Bad values fail where they are written, not later inside inject; inject validates again
        # because fields may be changed after construction.
        self.validate()

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            problem = _type_problem(getattr(self, field.name), _field_types(type(self))[field.name], field.name)
            if problem:
                raise ConfigError(problem)
        target_modules = getattr(self, "target_modules", None)
        if isinstance(target_modules, (list, tuple)):
            if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
                raise ConfigError(
                    f"target_modules={_shown(target_modules)} must be a non-empty list of module names, "
                    "a regex string, or 'all-linear'"
                )
        elif isinstance(target_modules, str):
            if target_modules != "all-linear":
                check_target_regex(target_modules)
        else:
            raise ConfigError(
                f"target_modules={_shown(target_modules)} must be a list of module names, a regex string, "
                "or 'all-linear'"
            )
        for name in self.regex_keyed_fields:
            check_pattern_keys(name, getattr(self, name))

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
        raise ConfigError(f"{name}={_shown(value)} is invalid: it must be a positive {kind} (> 0)")


def require_in_range(name: str, value: float, low: float, high: float, closed_high: bool = False) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if isinstance(value, bool) or not ok:
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{name}={_shown(value)} is invalid: it must lie in [{low}, {high}{bracket}")


def require_choice(name: str, value: Any, allowed: list[Any] | tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={_shown(value)} is invalid; allowed values: {', '.join(map(repr, allowed))}")


@functools.lru_cache(maxsize=None)
def _field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        key, value = typing.get_args(hint)
        return f"a mapping of {_describe(key)} to {_describe(value)}"
    return {int: "integer", float: "number", bool: "boolean", str: "string", Any: "value"}.get(hint, str(hint))


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the float range
        return False


def _shown(value: Any, limit: int = 120) -> str:
    """repr(value), cut short: a value from a file may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _same_kind(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (int, float):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(origin, type) and isinstance(value, origin)


def _type_problem(value: Any, hint: Any, where: str) -> str | None:
    """Why `value` does not fit the annotation `hint` (None when it does); `where` names the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        problems = [_type_problem(value, option, where) for option in options]
        if not all(problems):
            return None
        # The value has the shape of one option (a list, a number) but a bad element or value: say which.
        for option, problem in zip(options, problems):
            if _same_kind(value, option):
                return problem
        return f"{where}={_shown(value)} has the wrong type: expected {_describe(hint)}"
    if hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:  # numbers.Integral also admits numpy integers; a bool is never a count
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok and not _finite(value):
            return f"{where}={_shown(value)} is invalid: it must be a finite number"
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            return f"{where}={_shown(value)} has the wrong type: expected {_describe(hint)}"
        (item,) = typing.get_args(hint)
        for index, element in enumerate(value):
            problem = _type_problem(element, item, f"{where}[{index}]")
            if problem:
                return problem
        return None
    elif origin is dict:
        if not isinstance(value, dict):
            return f"{where}={_shown(value)} has the wrong type: expected {_describe(hint)}"
        key_hint, value_hint = typing.get_args(hint)
        for key, element in value.items():
            problem = (_type_problem(key, key_hint, f"{where} key")
                       or _type_problem(element, value_hint, f"{where}[{_shown(key, 80)}]"))
            if problem:
                return problem
        return None
    else:
        return None  # an annotation this check does not know: the subclass's validate owns it
    return None if ok else f"{where}={_shown(value)} has the wrong type: expected {_describe(hint)}"
