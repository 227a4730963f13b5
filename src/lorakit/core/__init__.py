"""Adapter core: config and registry, the Adapter base, AdaptedLinear, inject/merge/unload, io."""

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig
from lorakit.core.errors import AdapterFileError, ConfigError, LorakitError, TargetError
from lorakit.core.inject import (
    active_adapters,
    adapted_layers,
    adapter_configs,
    adapter_parameters,
    delete_adapter,
    disabled,
    inject,
    merge,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from lorakit.core.io import load_adapter, read_adapter_config, save_adapter
from lorakit.core.layer import AdaptedLinear
from lorakit.core.registry import register_method, registered_methods

__all__ = [
    "AdaptedLinear", "Adapter", "AdapterConfig", "AdapterFileError", "ConfigError", "LorakitError",
    "TargetError", "active_adapters", "adapted_layers", "adapter_configs", "adapter_parameters",
    "delete_adapter", "disabled", "inject", "load_adapter", "merge", "read_adapter_config",
    "register_method", "registered_methods", "save_adapter", "set_active", "trainable_parameters",
    "unload", "unmerge",
]
