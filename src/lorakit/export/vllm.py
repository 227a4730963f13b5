"""What vLLM's LoRA loader accepts, in one place: the checks, and the shape a LoRA must take.

From vLLM's loader (`vllm/lora/peft_helper.py`, `lora_model.py`, `utils.py`; see
../shared/INTEROP.md):

- It reads `r`, `lora_alpha`, `use_rslora` and `target_modules`, and applies ONE scaling to every
  module; `rank_pattern` / `alpha_pattern` are ignored without a word, so an adapter with
  per-module ranks or alphas would be served at the wrong scale.
- It refuses an adapter with `r` above the server's `--max-lora-rank` (default 16; the flag takes
  one of `MAX_LORA_RANK_CHOICES`), `use_dora`, any bias, or `modules_to_save`.
- Tensor keys must end in `lora_A.weight` / `lora_B.weight` and use the HF module names, unfused.

So an export for vLLM has one global rank r and alpha; a module of rank r_m < r is padded with
zeros to rank r, and its own scaling s_m is baked into B: B' = (s_m / s) [B, 0], A' = [A; 0],
where s = alpha / r is the one scaling vLLM applies. Then s B' A' = s_m B A for every module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import ConfigError

DEFAULT_MAX_LORA_RANK = 16
MAX_LORA_RANK_CHOICES = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig (recent releases)
TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def refuse_unless_plain_lora(config: AdapterConfig, adapter_dir: Path) -> None:
    """Raise unless the adapter's factors can be copied into vLLM's format as they are."""
    fix = f"lorakit export {adapter_dir} --to lora --rank R --for vllm"
    if config.method != "lora":
        raise ConfigError(
            f"{adapter_dir} holds a {config.method!r} adapter, not a LoRA (B A) update, so vLLM cannot "
            f"serve its tensors. Approximate it by a LoRA first: `{fix}` (truncated SVD of each layer's "
            "dW; the per-layer error is printed, and it is exact when R >= the rank of dW)"
        )
    if getattr(config, "use_dora", False):
        raise ConfigError(
            f"{adapter_dir} is a DoRA adapter: its magnitude vector rescales W itself, which vLLM's LoRA "
            f"format cannot express (vLLM refuses use_dora). Export its whole update dW instead: `{fix}`, "
            "exact up to the SVD truncation printed per layer (R = min(in, out) of the layers is exact)"
        )


def to_global_rank(A: torch.Tensor, B: torch.Tensor, scale: float, rank: int, global_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank `rank` with global_scale B' A' == scale B A: zero padding, scale ratio in B."""
    own_rank = A.shape[0]
    if own_rank > rank:
        raise ValueError(f"cannot pad a rank-{own_rank} factor pair down to rank {rank}")
    padded_A = A.new_zeros(rank, A.shape[1])
    padded_B = B.new_zeros(B.shape[0], rank)
    padded_A[:own_rank] = A
    padded_B[:, :own_rank] = B * (scale / global_scale)
    return padded_A, padded_B


def rank_warnings(rank: int) -> list[str]:
    """What a vLLM user must know about serving an adapter of rank `rank`."""
    if rank <= DEFAULT_MAX_LORA_RANK:
        return []
    fitting = [choice for choice in MAX_LORA_RANK_CHOICES if choice >= rank]
    if not fitting:
        return [f"rank {rank} is above {MAX_LORA_RANK_CHOICES[-1]}, the largest --max-lora-rank vLLM accepts; "
                "vLLM will refuse this adapter: export with a lower --rank"]
    return [f"rank {rank} is above vLLM's default max_lora_rank ({DEFAULT_MAX_LORA_RANK}); start the server with "
            f"`vllm serve BASE --enable-lora --max-lora-rank {fitting[0]} ...`, or export with --rank "
            f"{DEFAULT_MAX_LORA_RANK} or less"]


def config_problems(config: dict[str, Any], tensor_keys: Iterable[str]) -> list[str]:
    """Why vLLM would refuse (or silently mis-serve) an adapter with this config and these keys."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, vLLM loads only 'LORA'")
    if not isinstance(config.get("r"), int) or isinstance(config.get("r"), bool) or config["r"] <= 0:
        problems.append(f"r={config.get('r')!r} is not one positive integer rank")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r} is ignored by vLLM, which would serve those modules at the wrong scale")
    if config.get("use_dora"):
        problems.append("use_dora=True: vLLM refuses DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append(f"bias={config.get('bias')!r}: vLLM refuses adapter biases")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']!r}: vLLM refuses it")
    odd = sorted(key for key in tensor_keys if not key.endswith(TENSOR_SUFFIXES))
    if odd:
        problems.append(f"{len(odd)} tensor key(s) vLLM does not read, e.g. {odd[:3]} (it wants lora_A.weight / lora_B.weight)")
    return problems


def folder_problems(folder: str | Path) -> list[str]:
    """`config_problems` of a saved adapter folder (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    return config_problems(config, keys)
