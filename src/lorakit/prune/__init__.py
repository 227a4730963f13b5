"""Structured pruning guided by a LoRA (LoRAPrune, arXiv 2305.18403).

    pruned = lorakit.prune(model, 0.5, data=batches, out_dir="pruned")   # or `lorakit prune --ratio 0.5`

removes half of every decoder layer's key/value groups and MLP channels, scored by LoRAPrune's
LoRA-gradient importance while a LoRA is fine-tuned, merges the LoRA, and returns (and saves) a
physically smaller transformers model. See `lorakit.prune.loraprune` for the loop and the library
decisions, `lorakit.prune.importance` for the criterion, `lorakit.prune.structure` for the groups.
"""

from lorakit.prune.importance import element_importance, lora_weight_gradient, sparsity_at
from lorakit.prune.loraprune import PruneOptions, perplexity, prune, save_pruned

__all__ = ["PruneOptions", "element_importance", "lora_weight_gradient", "perplexity", "prune", "save_pruned", "sparsity_at"]
