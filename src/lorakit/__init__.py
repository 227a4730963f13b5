"""lorakit: the whole life of a low-rank adapter on PyTorch / Hugging Face models."""

from lorakit import init as _register_initialisers  # noqa: F401  (fills the initialiser registry)
from lorakit import methods as _register_methods  # noqa: F401  (fills the method registry)
# The tool subpackages come before `lorakit.core`'s functions: importing `lorakit.merge` (the
# adapter-merging package) or `lorakit.prune` binds the package to that attribute, and the public
# functions `lorakit.merge(model)` / `lorakit.prune(model, ...)` must be what the names end up as.
from lorakit import analysis, data, export, merge, models, optim, prune, quant, rank
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
from lorakit.merge import merge_adapters
from lorakit.methods import (
    AdaLoraConfig,
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
from lorakit.methods import IncreLoraConfig
from lorakit.optim import LISA
from lorakit.prune import prune
from lorakit.quant import quantize

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdaptedLinear", "Adapter", "AdapterConfig", "AdapterFileError", "BlockLoraConfig",
    "BoneConfig", "ConfigError", "KronConfig", "LISA", "LamdaConfig", "LolduConfig", "LoraConfig",
    "LoraXSConfig", "LorakitError", "NolaConfig", "RandLoraConfig", "TargetError", "VeraConfig",
    "active_adapters", "adapter_configs", "analysis", "delete_adapter", "disabled", "inject", "load_adapter",
    "merge", "merge_adapters", "prune", "quantize", "rank", "registered_methods", "save_adapter", "set_active",
    "trainable_parameters", "unload", "unmerge",
]
__all__ += ["IncreLoraConfig"]
