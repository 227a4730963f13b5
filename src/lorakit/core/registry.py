"""Registries: adapter methods by name, and weight-dependent initialisers by name.

Methods register themselves (``@register_method``) so that core never imports a method;
`lorakit.methods` is imported by the package top level, which fills the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from lorakit.core.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.core.adapter import Adapter
    from lorakit.core.config import AdapterConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type["AdapterConfig"]
    adapter_cls: type["Adapter"]
    peft_type: str | None  # PEFT's `peft_type` when PEFT has the method, so its folders load directly


_METHODS: dict[str, MethodSpec] = {}

# An initialiser that rewrites the base weight (PiSSA, OLoRA) is
# `fn(layer: AdaptedLinear, adapter_name: str) -> None`, run by `inject` right after the adapter exists.
WeightInitialiser = Callable[..., None]
_WEIGHT_INITIALISERS: dict[str, WeightInitialiser] = {}


def register_method(name: str, config: type, peft_type: str | None = None):
    """Class decorator for an Adapter subclass: registers it under `name` with its config class."""

    def decorate(adapter_cls):
        if name in _METHODS and _METHODS[name].adapter_cls is not adapter_cls:
            raise ValueError(f"method {name!r} is registered twice")
        config.method = name
        _METHODS[name] = MethodSpec(name, config, adapter_cls, peft_type)
        return adapter_cls

    return decorate


def method_spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_for_peft_type(peft_type: str) -> MethodSpec | None:
    for spec in _METHODS.values():
        if spec.peft_type == peft_type:
            return spec
    return None


def registered_methods() -> list[str]:
    return sorted(_METHODS)


def register_weight_initialiser(*names: str):
    def decorate(fn: WeightInitialiser) -> WeightInitialiser:
        for name in names:
            _WEIGHT_INITIALISERS[name] = fn
        return fn

    return decorate


def weight_initialiser(name: str) -> WeightInitialiser | None:
    """The initialiser registered for `name`; prefix match so 'pissa_niter_4' finds 'pissa_niter_'."""
    if name in _WEIGHT_INITIALISERS:
        return _WEIGHT_INITIALISERS[name]
    for key, fn in _WEIGHT_INITIALISERS.items():
        if key.endswith("_") and name.startswith(key):
            return fn
    return None


@dataclass(frozen=True)
class DataInitialiser:
    """An initialiser that estimates the adapter from data (EVA, LoRA-GA, LoRA-SB).

    `fn(model, adapter_name, data, options, progress) -> None` runs inside `inject(..., data=...)`
    once every adapter exists (and before `initialise_from_base`); `data` is an iterable of dicts
    the model accepts, with `labels`. `options` is an instance of the `options` dataclass built
    from the config's `init_options` (validated when the config is)."""

    name: str
    fn: Callable[..., None]
    options: type


_DATA_INITIALISERS: dict[str, DataInitialiser] = {}


def register_data_initialiser(name: str, options: type):
    def decorate(fn):
        _DATA_INITIALISERS[name] = DataInitialiser(name, fn, options)
        return fn

    return decorate


def data_initialiser(name: str) -> DataInitialiser | None:
    return _DATA_INITIALISERS.get(name)


def init_options(init: str, options: dict):
    """The options dataclass of initialiser `init` built from `options` (a config's `init_options`);
    unknown keys, or options given to an initialiser that takes none, are errors."""
    from lorakit.core.config import reject_unknown_fields

    spec = _DATA_INITIALISERS.get(init)
    if spec is None:
        if options:
            raise ConfigError(f"init_options={options!r} given, but init={init!r} takes no options")
        return None
    reject_unknown_fields(spec.options, options)
    return spec.options(**options)
