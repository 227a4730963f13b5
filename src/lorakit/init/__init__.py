"""Initialisers chosen by name in the config (`init=...`); importing registers them."""

from lorakit.init.svd import olora_init, pissa_init

__all__ = ["olora_init", "pissa_init"]
