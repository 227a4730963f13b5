"""The one adapter abstraction every method family subclasses."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from lorakit.core.config import AdapterConfig


class Adapter(nn.Module, abc.ABC):
    """One method's update for one layer.

    A subclass implements the two maps that define a method:

    - ``forward(x, base_out, base) -> out``: the adapted output given the input, the frozen
      base layer's output on that input, and the base layer itself (methods whose update
      depends on W, such as DoRA or Bone, read it from `base`).
    - ``delta_weight(base_weight) -> dW`` with W' = W + dW, in the (out, in) layout whatever
      the base layer's storage; merge, unmerge and export use it.

    Trainable parameters are ordinary `nn.Parameter`s. Parameter names are the suffixes of the
    keys in the adapter file, so methods that PEFT has use PEFT's names.
    """

    # File keys outside any module path -> the buffer they fill on every layer (PEFT's shared
    # projections, e.g. VeRA's "base_model.vera_A"). Loaders accept them; lorakit never writes them.
    SHARED_KEYS: ClassVar[dict[str, str]] = {}

    # True when the adapter file holds everything `initialise_from_base` computes (LoRA-XS's SVD
    # factors, say), so loading skips that possibly costly step.
    BASE_STATE_IN_FILE: ClassVar[bool] = False

    def __init__(self, config: AdapterConfig, in_features: int, out_features: int, module_name: str):
        super().__init__()
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        self.module_name = module_name

    @classmethod
    def prepare_shared(cls, config: AdapterConfig, shapes: list[tuple[int, int]]) -> dict:
        """Keyword arguments given to every layer's constructor in one `inject`, computed once
        from the config and the (in, out) shapes of all targeted layers (VeRA's shared random
        bases, sized to the largest layer). Default: none."""
        return {}

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The adapted output of the base layer on `x`."""

    @abc.abstractmethod
    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """dW such that the merged weight is W + dW, in the (out, in) layout."""

    def initialise_from_base(self, base_weight: torch.Tensor) -> None:
        """Hook run by `inject` once the factors are final (after any initialiser that rewrites
        W), for state computed from the base weight, such as DoRA's magnitude. Default: none."""

    def merge_delta(self, base_weight: torch.Tensor) -> torch.Tensor:
        """dW to add when merging into `base_weight`. Methods whose dW depends on W cache here
        whatever `unmerge_delta` needs to undo the merge exactly."""
        return self.delta_weight(base_weight)

    def unmerge_delta(self, merged_weight: torch.Tensor) -> torch.Tensor:
        """dW to subtract from a weight this adapter was merged into."""
        return self.delta_weight(merged_weight)

    def factors(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(A, B) pairs with dW proportional to B @ A, for optimisers that treat factors jointly
        (LoRA+, LoRA-Pro); empty for methods whose update is not such a product."""
        return []

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors written to the adapter file, keyed by their suffix after the module path."""
        return {key: value.detach() for key, value in self.state_dict().items()}

    def optional_file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a file may also hold for this layer, keyed by suffix, that lorakit never writes
        (PEFT's per-layer copies of RandLoRA's bases). Loaders check their shapes when present and
        pass them to `load_file_tensors`. Default: none."""
        return {}

    def load_shared_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy shared tensors (keys of SHARED_KEYS, shapes already checked) into their buffers."""
        with torch.no_grad():
            for key, name in self.SHARED_KEYS.items():
                if key in tensors:
                    getattr(self, name).copy_(tensors[key])

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors from a file (keys as in `file_tensors`; shapes already checked)."""
        self.load_state_dict(tensors, strict=True)
