"""`AdaptedLinear`: a frozen linear layer plus any number of named adapters."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.core.adapter import Adapter

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency, kept soft for core
    Conv1D = ()

ADAPTABLE_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear`, transformers `Conv1D` (stored (in, out)) or `AdaptedLinear`
    as an (out, in) view of its storage."""
    if isinstance(layer, AdaptedLinear):
        return layer.weight_out_in()
    return layer.weight.data if isinstance(layer, nn.Linear) else layer.weight.data.T


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear` or transformers `Conv1D`."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_features, out_features = layer.weight.shape  # Conv1D keeps (in, out)
    return in_features, out_features


class AdaptedLinear(nn.Module):
    """Wraps a frozen base layer; adds the outputs of the active, unmerged adapters.

    ``active`` lists the adapters that take part in forward; ``merged`` lists those folded into
    ``base.weight`` (in merge order). With one active adapter the output is that adapter's
    ``forward(x, base_out, base)``; with several, each adapter's contribution relative to the
    same base output is summed, so adapters never see each other's updates.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, ADAPTABLE_LAYERS):
            raise TypeError(f"AdaptedLinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base = base
        self.adapters = nn.ModuleDict()
        self._active: list[str] = []
        self.merged: list[str] = []
        self._adapters_disabled = False
        self._running: tuple[Adapter, ...] = ()  # active, unmerged adapters; rebuilt on change, not per call
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        self.in_features, self.out_features = layer_features(base)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    @active.setter
    def active(self, names: list[str]) -> None:
        self._active = list(names)
        self._refresh_running()

    @property
    def adapters_disabled(self) -> bool:
        return self._adapters_disabled

    @adapters_disabled.setter
    def adapters_disabled(self, value: bool) -> None:
        self._adapters_disabled = bool(value)
        self._refresh_running()

    def _refresh_running(self) -> None:
        names = [] if self._adapters_disabled else [
            n for n in self._active if n not in self.merged and n in self.adapters
        ]
        self._running = tuple(self.adapters[n] for n in names)

    # Code elsewhere in transformers reads `.weight` / `.bias` of projection layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) view of its storage (a transpose for Conv1D)."""
        weight = self.base.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        self._refresh_running()

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before removing it")
        del self.adapters[name]
        self.active = [n for n in self._active if n != name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base_out = self.base(x, *args, **kwargs)
        running = self._running
        if not running:
            return base_out
        if len(running) == 1:
            return running[0](x, base_out, self.base)
        out = base_out
        for adapter in running:
            out = out + (adapter(x, base_out, self.base) - base_out)
        return out

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        weight = self.weight_out_in()
        delta = self.adapters[name].merge_delta(weight)
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged.append(name)
        self._refresh_running()

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        if self.merged[-1] != name:
            # dW of weight-dependent methods (DoRA) was computed on the weight as it was at merge time.
            raise ValueError(
                f"adapter {name!r} was merged before {self.merged[self.merged.index(name) + 1:]}; "
                "unmerge in reverse merge order (lorakit.unmerge(model) does that)"
            )
        weight = self.weight_out_in()
        delta = self.adapters[name].unmerge_delta(weight)
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged.pop()
        self._refresh_running()

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"
