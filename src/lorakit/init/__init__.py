"""Initialisers chosen by name in the config (`init=...`); importing registers them.

W-rewriting: "pissa", "olora" (`svd`). Data-driven, given `inject(..., data=batches)`: "eva",
"lora-ga" (LoraConfig) and "lora-sb" (LoraXSConfig), sharing the gradient estimator in `gradients`.
"""

from lorakit.init.eva import EvaOptions, eva_init
from lorakit.init.lora_ga import LoraGAOptions, lora_ga_init
from lorakit.init.lora_sb import LoraSBOptions, lora_sb_init
from lorakit.init.svd import olora_init, pissa_init

__all__ = ["EvaOptions", "LoraGAOptions", "LoraSBOptions", "eva_init", "lora_ga_init", "lora_sb_init", "olora_init",
           "pissa_init"]
