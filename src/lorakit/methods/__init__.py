"""Adapter families; importing this package registers every method."""

from lorakit.methods.bone import BoneAdapter, BoneConfig
from lorakit.methods.lora import LoraAdapter, LoraConfig
from lorakit.methods.vera import VeraAdapter, VeraConfig

__all__ = ["BoneAdapter", "BoneConfig", "LoraAdapter", "LoraConfig", "VeraAdapter", "VeraConfig"]
