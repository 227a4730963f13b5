"""What a rank policy is, and the registry `lorakit train --rank-policy NAME` reads.

A rank policy is a `transformers.TrainerCallback` with three extra, loop-agnostic entry points:

- `hold_out(examples, collate, batch_size, seed) -> examples`: runs once on the encoded training
  examples; returns those the run trains on (DiffoRA keeps some for its gate steps).
- `prepare_config(model, config) -> config`: runs once on the base model before `inject`
  (LaMDA++ writes its per-module ranks into the config here; most policies return it unchanged).
- `final_ranks(model) -> {module path: rank}`: the ranks at the end, for the printed table and
  the saved `rank_pattern`.

Policies that act during training implement their plain-loop method (AdaLoRA: `step`) and call it
from the matching Trainer event, so one implementation serves both. A policy that needs a
particular adapter family says so in `method` (AdaLoRA needs the SVD-form "adalora" adapter);
`lorakit train --rank-policy adalora` then trains that family unless another --method is given,
which is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from transformers import TrainerCallback

from lorakit.core.config import AdapterConfig, reject_unknown_fields
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, adapter_configs


class RankPolicy(TrainerCallback):
    name: ClassVar[str] = ""
    method: ClassVar[str | None] = None  # the adapter family the policy needs, if any

    def prepare_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        return config

    def hold_out(self, examples: list, collate, batch_size: int, seed: int = 0) -> list:
        """The training examples the run trains on; a policy that needs held-out batches of its own
        (DiffoRA's gate steps) keeps some here and returns the rest. Default: all of them."""
        return examples

    def final_ranks(self, model: nn.Module) -> dict[str, int]:
        """{module path: rank} after training; every policy defines it (the table and the saved
        rank_pattern come from it)."""
        raise NotImplementedError(f"{type(self).__name__} must define final_ranks")

    def required_adapter(self, model: nn.Module, name: str, config_class: type) -> tuple[AdapterConfig, dict[str, nn.Module]]:
        """(config, {module path: adapter}) of the adapter `name`, which must be of this policy's
        family (`method`, configured by `config_class`); otherwise an error naming the fix."""
        config = adapter_configs(model).get(name)
        if not isinstance(config, config_class):
            raise ConfigError(
                f"the {self.name} policy needs an adapter of method {self.method!r} named {name!r}; the model has "
                f"{ {k: v.method for k, v in adapter_configs(model).items()} or 'none'}. Inject "
                f"lorakit.{config_class.__name__}(...) first (lorakit train: --method {self.method})"
            )
        return config, {path: layer.adapters[name] for path, layer in adapted_layers(model) if name in layer.adapters}

    def rank_table(self, model: nn.Module, adapter_name: str = "default") -> str:
        from lorakit.rank.budget import format_rank_table

        shapes = {path: (layer.in_features, layer.out_features) for path, layer in adapted_layers(model)
                  if adapter_name in layer.adapters}
        return format_rank_table(self.final_ranks(model), shapes, getattr(self, "budget", None))


@dataclass(frozen=True)
class PolicySpec:
    name: str
    cls: type
    options: type  # dataclass of the policy's options (`--rank-policy-options '{...}'`)


_POLICIES: dict[str, PolicySpec] = {}


def register_rank_policy(name: str, options: type):
    def decorate(cls):
        cls.name = name
        _POLICIES[name] = PolicySpec(name, cls, options)
        return cls

    return decorate


def registered_rank_policies() -> list[str]:
    return sorted(_POLICIES)


def rank_policy_spec(name: str) -> PolicySpec:
    if name not in _POLICIES:
        raise ConfigError(f"unknown rank_policy {name!r}; registered: {', '.join(registered_rank_policies())}")
    return _POLICIES[name]


def rank_policy_options(name: str, options: dict[str, Any]):
    spec = rank_policy_spec(name)
    reject_unknown_fields(spec.options, options)
    return spec.options(**options)


def build_rank_policy(name: str, options: dict[str, Any]) -> RankPolicy:
    """The policy `name` with its options (unknown keys are errors)."""
    return rank_policy_spec(name).cls(options=rank_policy_options(name, options))
