"""`TrainConfig`: everything `lorakit train` needs, with a default for every field.

Read from one YAML file and/or command-line flags; the adapter's own hyperparameters sit in the
`adapter` mapping and are checked by the method's config class (e.g. `LoraConfig.validate`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.core.config import reject_unknown_fields
from lorakit.core.errors import ConfigError
from lorakit.core.registry import method_spec

# Fields given to the method's config unless the user sets them; other fields keep the config
# class's own defaults. LoRA's r=16, alpha=32 are what the default task was measured with.
METHOD_DEFAULTS = {"lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}}


@dataclass
class TrainConfig:
    """model: embedded default name, local HF folder, .gguf file, or a hub id already in the cache.
    data: None for the built-in default task; else a JSONL/JSON/CSV file or folder, or a cached HF dataset.
    eval_data: held-out file; None splits `eval_fraction` of `data` off by a hash of each prompt.
    prompt_field / response_field: override the auto-detected record layout.
    method / adapter: the adapter family and its config fields.
    output_dir: run folder (adapter/, checkpoints/, metrics.json, config.yaml, loss_curve.png).
    max_steps, batch_size, gradient_accumulation_steps, learning_rate, weight_decay, warmup_steps,
    lr_scheduler: optimisation. optimizer / optimizer_options: a registered optimiser
    (`lorakit.optim.registered_optimizers()`; default AdamW) and its options.
    init_batches: training batches a data-driven init (init="eva", "lora-ga", "lora-sb") may read.
    lisa_layers / lisa_interval: LISA schedule (`lorakit.LISA`): only `lisa_layers` decoder layers'
    adapter parameters train, re-drawn (seeded by `seed`) every `lisa_interval` steps; 0: off.
    save_steps: checkpoint every N steps (0: never).
    rank_policy / rank_policy_options: a rank policy (`lorakit.rank.registered_rank_policies()`: "adalora",
    "lamda++", ...) and its options; the final per-module ranks are printed and saved in the adapter.
    A policy that needs its own adapter family ("adalora") selects it when `method` is left at "lora".
    eval_examples: held-out examples scored (loss and exact match); max_new_tokens for generation.
    dtype: "auto", "float32" or "bfloat16" (`lorakit.core.precision`): bfloat16 stores the base
    weights in bf16 and computes under bf16 autocast, with the adapter and optimizer state in
    float32; "auto" is bfloat16 where the hardware runs bf16 products fast, float32 elsewhere (for a
    model passed to `train(model=...)`, "auto" keeps the dtype that model has).
    """

    model: str = "smollm2-135m-instruct"
    data: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.1
    prompt_field: str | None = None
    response_field: str | None = None
    train_examples: int | None = None
    method: str = "lora"
    adapter: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    # Defaults are the settings measured on the built-in task (lorakit.data.default_task.RECOMMENDED).
    max_steps: int = 96
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 3
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    init_batches: int = 8
    lisa_layers: int = 0
    lisa_interval: int = 20
    rank_policy: str | None = None
    rank_policy_options: dict[str, Any] = field(default_factory=dict)
    max_length: int = 512
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 32
    eval_examples: int = 100
    eval_batch_size: int = 32
    max_new_tokens: int = 16
    threads: int | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / time.strftime("lorakit-%Y%m%d-%H%M%S"))
        if self.rank_policy is not None and self.method == "lora":  # e.g. --rank-policy adalora alone
            from lorakit.rank import policy as rank_policies

            self.method = rank_policies.rank_policy_spec(self.rank_policy).cls.method or self.method

    def adapter_config(self):
        spec = method_spec(self.method)
        config = spec.config_cls.from_dict({**METHOD_DEFAULTS.get(self.method, {}), **self.adapter})
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_length", "eval_batch_size",
                     "max_new_tokens", "logging_steps", "init_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} is invalid: it must be a positive integer")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} is invalid: it must be > 0")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction!r} is invalid: it must lie in (0, 1)")
        if self.save_steps < 0 or self.eval_examples < 0 or self.warmup_steps < 0:
            raise ConfigError("save_steps, eval_examples and warmup_steps must be >= 0")
        if isinstance(self.lisa_layers, bool) or not isinstance(self.lisa_layers, int) or self.lisa_layers < 0:
            raise ConfigError(f"lisa_layers={self.lisa_layers!r} is invalid: it must be an integer >= 0 (0: LISA off)")
        if isinstance(self.lisa_interval, bool) or not isinstance(self.lisa_interval, int) or self.lisa_interval <= 0:
            raise ConfigError(f"lisa_interval={self.lisa_interval!r} is invalid: it must be a positive integer")
        from lorakit.core.precision import DTYPE_CHOICES

        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype={self.dtype!r} is invalid: expected one of {', '.join(DTYPE_CHOICES)}")
        from lorakit.optim import optimizer_options

        optimizer_options(self.optimizer, self.optimizer_options)
        if self.rank_policy is not None:
            from lorakit.rank import policy as rank_policies

            rank_policies.rank_policy_options(self.rank_policy, self.rank_policy_options)
            needs = rank_policies.rank_policy_spec(self.rank_policy).cls.method
            if needs is not None and self.method != needs:
                raise ConfigError(f"rank_policy={self.rank_policy!r} works on {needs!r} adapters, not method="
                                  f"{self.method!r}; pass --method {needs} (or leave --method unset)")
        self.adapter_config()

    def to_dict(self) -> dict[str, Any]:
        """All fields, with `adapter` resolved to every field of the method's config."""
        data = dataclasses.asdict(self)
        data["adapter"] = self.adapter_config().to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        reject_unknown_fields(cls, data)
        data = dict(data)
        data["adapter"] = dict(data.get("adapter") or {})
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
        return cls.from_dict(merge_overrides(data, overrides or {}))


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(data)
    for key, value in overrides.items():
        if key == "adapter":
            merged["adapter"] = {**(merged.get("adapter") or {}), **value}
        else:
            merged[key] = value
    return merged
