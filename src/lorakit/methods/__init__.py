"""Adapter families; importing this package registers every method."""

from lorakit.methods.adalora import AdaLoraAdapter, AdaLoraConfig
from lorakit.methods.block_lora import BlockLoraAdapter, BlockLoraConfig
from lorakit.methods.bone import BoneAdapter, BoneConfig
from lorakit.methods.increlora import IncreLoraAdapter, IncreLoraConfig
from lorakit.methods.kron import KronAdapter, KronConfig
from lorakit.methods.lamda import LamdaAdapter, LamdaConfig
from lorakit.methods.loldu import LolduAdapter, LolduConfig
from lorakit.methods.lora import LoraAdapter, LoraConfig
from lorakit.methods.loraxs import LoraXSAdapter, LoraXSConfig
from lorakit.methods.nola import NolaAdapter, NolaConfig
from lorakit.methods.randlora import RandLoraAdapter, RandLoraConfig
from lorakit.methods.vera import VeraAdapter, VeraConfig

__all__ = [
    "BlockLoraAdapter", "BlockLoraConfig", "BoneAdapter", "BoneConfig", "KronAdapter", "KronConfig", "LamdaAdapter",
    "LamdaConfig", "LolduAdapter", "LolduConfig", "LoraAdapter", "LoraConfig", "LoraXSAdapter", "LoraXSConfig",
    "NolaAdapter", "NolaConfig", "RandLoraAdapter", "RandLoraConfig", "VeraAdapter", "VeraConfig",
]
__all__ += ["AdaLoraAdapter", "AdaLoraConfig"]
__all__ += ["IncreLoraAdapter", "IncreLoraConfig"]
