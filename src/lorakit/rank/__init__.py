"""Rank policies: one mechanism (`budget`: per-module ranks under a global budget, parameters that
appear or vanish with the optimizer and scheduler kept consistent) and the policies built on it,
each a `transformers.TrainerCallback` that also works in a plain loop:

- "adalora"  (`AdaLoraAllocator`): prunes singular triplets by importance, cubic budget schedule.
- "lamda++"  (`LamdaPlusPlus`): ranks from the pre-trained weights' spectra, once before training.
- "diffora"  (`DiffoRA`): which modules get LoRA at all, by a gate search then top-K selection.
- "increlora" (`IncreLoraAllocator`): grows the most important modules' ranks up to a budget.

`lorakit train --rank-policy NAME [--rank-policy-options JSON]` selects one.
"""

from lorakit.rank.adalora import AdaLoraAllocator, AdaLoraOptions
from lorakit.rank.budget import (
    RankBudget,
    add_param_group,
    format_rank_table,
    linear_warmup_decay,
    remove_parameters,
    replace_parameters,
)
from lorakit.rank.diffora import DiffoRA, DiffoRAOptions
from lorakit.rank.increlora import IncreLoraAllocator, IncreLoraOptions
from lorakit.rank.lamda_pp import LamdaPlusPlus, LamdaPPOptions, lamda_pp_ranks
from lorakit.rank.policy import RankPolicy, build_rank_policy, register_rank_policy, registered_rank_policies

__all__ = [
    "AdaLoraAllocator", "AdaLoraOptions", "LamdaPPOptions", "LamdaPlusPlus", "RankBudget", "RankPolicy",
    "add_param_group", "build_rank_policy", "format_rank_table", "lamda_pp_ranks", "linear_warmup_decay",
    "register_rank_policy", "registered_rank_policies", "remove_parameters", "replace_parameters",
    "DiffoRA", "DiffoRAOptions",
    "IncreLoraAllocator", "IncreLoraOptions",
]
