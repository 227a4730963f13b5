"""The prunable groups of a Llama-family decoder, output masks on them, and physical pruning.

A decoder layer has two kinds of groups:

- **KV groups** (attention): one key/value head together with the `n_rep = n_heads / n_kv` query
  heads that read it (transformers' `repeat_kv` gives KV head j the query heads j*n_rep ..
  (j+1)*n_rep - 1). Pruning whole KV groups keeps `n_rep` the same in every layer, which
  grouped-query attention needs; with multi-head attention a KV group is one head.
- **MLP channels**: one intermediate channel of gate/up (a row of each) and down (a column).

During training a group is switched off by multiplying the *outputs* of q, k, v (per head) and of
gate, up (per channel) by a 0/1 mask, as LoRAPrune's masked LoRA layer does: a masked value head
adds nothing to o_proj's input, and silu(0) * 0 = 0 adds nothing to down_proj's input.
Physical pruning keeps the rows of q, k, v, gate, up (and their biases) and the columns of o_proj /
down_proj where the mask is 1, so the smaller model computes exactly what the masked one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.core.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FAN_IN = ("o_proj", "down_proj")  # scored over their input channels (the groups' outputs feed them)


@dataclass
class DecoderGroups:
    """One decoder layer's attention and MLP modules, the group sizes, and the current masks."""

    index: int
    attention: nn.Module
    mlp: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    prunable: bool = True
    kv_mask: torch.Tensor = field(default=None)  # (n_kv,) 1 = kept
    channel_mask: torch.Tensor = field(default=None)  # (intermediate,)

    def __post_init__(self) -> None:
        device = self.attention.q_proj.weight.device
        if self.kv_mask is None:
            self.kv_mask = torch.ones(self.n_kv, device=device)
        if self.channel_mask is None:
            self.channel_mask = torch.ones(self.intermediate, device=device)

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv

    def module(self, name: str) -> nn.Module:
        return getattr(self.attention if name in ATTENTION else self.mlp, name)

    def output_mask(self, name: str) -> torch.Tensor:
        """The 0/1 mask over the output features of q/k/v/gate/up."""
        if name == "q_proj":
            return self.kv_mask.repeat_interleave(self.n_rep * self.head_dim)
        if name in ("k_proj", "v_proj"):
            return self.kv_mask.repeat_interleave(self.head_dim)
        if name in ("gate_proj", "up_proj"):
            return self.channel_mask
        raise ValueError(f"{name} has no output mask")

    def kept_query_heads(self) -> torch.Tensor:
        return self.kv_mask.repeat_interleave(self.n_rep).nonzero().flatten()


def decoder_groups(model: nn.Module) -> list[DecoderGroups]:
    """Every decoder layer of a Llama-family causal LM (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)."""
    config = getattr(model, "config", None)
    layers = None
    for path in ("model.layers", "model.model.layers", "layers"):
        try:
            layers = model.get_submodule(path)
            break
        except AttributeError:
            continue
    if config is None or layers is None:
        raise ConfigError(
            f"{type(model).__name__} is not a Llama-family transformers model (no config or model.layers); "
            "pruning needs decoder layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj"
        )
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    groups = []
    for index, layer in enumerate(layers):
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [n for n in ATTENTION if not hasattr(attention, n)] + [n for n in MLP if not hasattr(mlp, n)]
        if missing:
            raise ConfigError(
                f"decoder layer {index} ({type(layer).__name__}) lacks {missing}; structured pruning supports "
                "Llama-family layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj: Llama, Mistral, Qwen2, ...)"
            )
        n_q = _out_features(attention.q_proj) // head_dim
        n_k = _out_features(attention.k_proj) // head_dim
        groups.append(DecoderGroups(index, attention, mlp, n_q, n_k, head_dim, _out_features(mlp.gate_proj)))
    return groups


def _out_features(module: nn.Module) -> int:
    return module.out_features


def keep_count(n_groups: int, ratio: float) -> int:
    """Groups kept when a fraction `ratio` is pruned: n - floor(n * ratio)."""
    return n_groups - int(n_groups * ratio)


class OutputMasks:
    """Forward hooks that multiply q/k/v/gate/up outputs by their group masks (while installed)."""

    def __init__(self, groups: list[DecoderGroups]):
        self.handles = []
        for group in groups:
            if not group.prunable:
                continue
            for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                self.handles.append(group.module(name).register_forward_hook(self._hook(group, name)))

    @staticmethod
    def _hook(group: DecoderGroups, name: str):
        def hook(module, inputs, output):
            return output * group.output_mask(name).to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear keeping rows (dim=0, output features) or columns (dim=1) `index`."""
    if not isinstance(linear, nn.Linear):
        raise ConfigError(f"physical pruning needs plain nn.Linear layers, found {type(linear).__name__}; "
                          "merge or unload adapters first")
    weight = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias.data.index_select(0, index.to(bias.device)) if dim == 0 else bias.data)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@torch.no_grad()
def prune_layer(group: DecoderGroups) -> None:
    """Physically remove the masked KV groups and MLP channels of one decoder layer (plain nn.Linear)."""
    attention, mlp, hd = group.attention, group.mlp, group.head_dim
    kv_kept = group.kv_mask.nonzero().flatten()
    q_heads = group.kept_query_heads()
    q_index = (q_heads[:, None] * hd + torch.arange(hd, device=q_heads.device)).flatten()
    kv_index = (kv_kept[:, None] * hd + torch.arange(hd, device=kv_kept.device)).flatten()
    attention.q_proj = _slice_linear(attention.q_proj, q_index, 0)
    attention.k_proj = _slice_linear(attention.k_proj, kv_index, 0)
    attention.v_proj = _slice_linear(attention.v_proj, kv_index, 0)
    attention.o_proj = _slice_linear(attention.o_proj, q_index, 1)
    channels = group.channel_mask.nonzero().flatten()
    mlp.gate_proj = _slice_linear(mlp.gate_proj, channels, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, channels, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, channels, 1)
    group.n_heads, group.n_kv, group.intermediate = len(q_heads), len(kv_kept), len(channels)
    group.kv_mask = group.kv_mask.new_ones(group.n_kv)
    group.channel_mask = group.channel_mask.new_ones(group.intermediate)
    for attr, value in (("num_heads", group.n_heads), ("num_key_value_heads", group.n_kv)):
        if hasattr(attention, attr):  # older transformers keep these on the module
            setattr(attention, attr, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = group.intermediate


def update_config(model: nn.Module, groups: list[DecoderGroups]) -> bool:
    """Write the pruned sizes into `model.config`; True when every layer has the same sizes
    (the only case a transformers Llama config can describe)."""
    sizes = {(g.n_heads, g.n_kv, g.intermediate) for g in groups}
    config = model.config
    config.head_dim = groups[0].head_dim  # no longer hidden_size / num_attention_heads
    if len(sizes) != 1:
        return False
    config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = sizes.pop()
    return True
