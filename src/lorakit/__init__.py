"""lorakit: the whole life of a low-rank adapter on PyTorch / Hugging Face models."""

from lorakit import init as _register_initialisers  # noqa: F401  (fills the initialiser registry)
from lorakit import methods as _register_methods  # noqa: F401  (fills the method registry)
from lorakit import data, export, models, optim
from lorakit.core import (
    AdaptedLinear,
    Adapter,
    AdapterConfig,
    AdapterFileError,
    ConfigError,
    LorakitError,
    TargetError,
    active_adapters,
    adapter_configs,
    delete_adapter,
    disabled,
    inject,
    load_adapter,
    merge,
    registered_methods,
    save_adapter,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from lorakit.methods import (
    BlockLoraConfig,
    BoneConfig,
    KronConfig,
    LamdaConfig,
    LolduConfig,
    LoraConfig,
    LoraXSConfig,
    NolaConfig,
    RandLoraConfig,
    VeraConfig,
)
from lorakit.optim import LISA

__version__ = "0.1.0"

__all__ = [
    "AdaptedLinear", "Adapter", "AdapterConfig", "AdapterFileError", "BlockLoraConfig", "BoneConfig", "ConfigError",
    "KronConfig", "LISA", "LamdaConfig", "LolduConfig", "LoraConfig", "LoraXSConfig", "LorakitError", "NolaConfig",
    "RandLoraConfig", "TargetError", "VeraConfig", "active_adapters", "adapter_configs", "delete_adapter",
    "disabled", "inject", "load_adapter", "merge", "registered_methods", "save_adapter", "set_active",
    "trainable_parameters", "unload", "unmerge",
]
