"""Adapter families; importing this package registers every method."""

from lorakit.methods.lora import LoraAdapter, LoraConfig

__all__ = ["LoraAdapter", "LoraConfig"]
