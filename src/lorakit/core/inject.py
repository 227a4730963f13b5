"""Model-level operations: inject adapters, choose the active set, merge, unmerge, unload."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import ConfigError, TargetError
from lorakit.core.layer import ADAPTABLE_LAYERS, AdaptedLinear, layer_features
from lorakit.core.patterns import fullmatch_target
from lorakit.core.registry import data_initialiser, init_options, method_spec, weight_initialiser

_ADAPTABLE = ADAPTABLE_LAYERS + (AdaptedLinear,)

CONFIGS_ATTR = "_lorakit_configs"  # {adapter name: config} kept on the model object


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The configs of the adapters injected into `model`, by adapter name."""
    return getattr(model, CONFIGS_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """(module path, layer) for every AdaptedLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return {name for name, _ in model.named_modules() if name.split(".")[-1] == "lm_head"}
    return {name for name, module in model.named_modules() if module is head}


def _matches(target_modules: str | list[str], name: str) -> bool:
    if isinstance(target_modules, str):
        return fullmatch_target(target_modules, name)
    return any(name == key or name.endswith("." + key) for key in target_modules)


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules a target may name: everything except the insides of an AdaptedLinear."""
    inner: set[int] = set()
    for _, layer in adapted_layers(model):
        inner.update(id(m) for m in layer.modules() if m is not layer)
    return [(n, m) for n, m in model.named_modules() if n and id(m) not in inner]


def _linear_names_summary(model: nn.Module) -> str:
    names = [n for n, m in _candidate_modules(model) if isinstance(m, _ADAPTABLE)]
    suffixes = list(dict.fromkeys(n.split(".")[-1] for n in names))
    return ", ".join(suffixes) + f" (full paths look like {names[0]!r})" if names else "none"


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Module paths that `target_modules` selects, checked to be layers lorakit can adapt."""
    candidates = _candidate_modules(model)
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        targets = [
            n for n, m in candidates if isinstance(m, _ADAPTABLE) and n not in heads
        ]
    else:
        selected = [(n, m) for n, m in candidates if _matches(target_modules, n)]
        # A list entry like "self_attn" may also match containers; those are skipped, but an
        # explicitly selected leaf of an unsupported kind (embedding, convolution) is an error.
        unsupported = [
            f"{n} ({type(m).__name__})"
            for n, m in selected
            if not isinstance(m, _ADAPTABLE) and next(m.children(), None) is None
        ]
        if unsupported:
            raise TargetError(
                f"target_modules={target_modules!r} selects layers this method cannot adapt: "
                f"{', '.join(unsupported[:8])}. Supported layers are nn.Linear and transformers' "
                f"Conv1D; the model's adaptable layers are: {_linear_names_summary(model)}"
            )
        targets = [n for n, m in selected if isinstance(m, _ADAPTABLE)]
    if not targets:
        raise TargetError(
            f"target_modules={target_modules!r} matched no Linear layer; "
            f"the model has: {_linear_names_summary(model)}"
        )
    return targets


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _wrap(model: nn.Module, path: str) -> AdaptedLinear:
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLinear):
        return module
    layer = AdaptedLinear(module)
    _replace_module(model, path, layer)
    return layer


def inject(model: nn.Module, config: AdapterConfig, name: str = "default", *, data: Iterable[dict] | None = None,
           progress: bool = True, rewrite_weights: bool = True, state_from_file: bool = False) -> nn.Module:
    """Wrap every layer `config.target_modules` selects and add adapter `name` to it.

    The base model is frozen. The first adapter injected becomes active; later ones are added
    inactive (choose with `set_active`). Initialisers that rewrite W (PiSSA, OLoRA) run here
    unless `rewrite_weights=False` (loaders use that to check a file before touching W).
    `state_from_file=True` (loaders) skips `initialise_from_base` for methods whose file holds its result.

    Initialisers that estimate the adapter from data (`init="eva"`, `"lora-ga"`, `"lora-sb"`) take
    `data`: an iterable of dicts the model accepts, with `labels` (`progress` shows their bar).
    """
    config.validate()
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name {name!r} is invalid: use a non-empty string without '.'")
    configs = adapter_configs(model)
    if name in configs:
        raise ConfigError(
            f"an adapter named {name!r} is already injected; pick another name, or remove it first "
            "with lorakit.delete_adapter(model, name)"
        )
    spec = method_spec(config.method)
    targets = find_targets(model, config.target_modules)

    requires_grad = requires_grad_flags(model)
    for param in model.parameters():
        param.requires_grad_(False)
    # Only adapter parameters train; `requires_grad` set in the adapter's constructor is kept.
    object.__setattr__(model, CONFIGS_ATTR, {**configs, name: config})
    init_name = getattr(config, "init", "default")
    rewrite = weight_initialiser(init_name) if rewrite_weights and isinstance(init_name, str) else None
    from_data = data_initialiser(init_name) if isinstance(init_name, str) and not state_from_file else None
    if from_data is not None and data is None:
        raise ConfigError(
            f"init={init_name!r} estimates the adapter from data: pass training batches, e.g. "
            "lorakit.inject(model, config, data=batches), with batches an iterable of dicts the model accepts "
            "(input_ids, attention_mask, labels)"
        )
    if from_data is None and data is not None and not state_from_file:
        raise ConfigError(f"data was given, but init={init_name!r} does not use data; drop it or pick a data-driven init")
    try:
        shapes = [layer_features(model.get_submodule(path)) for path in targets]
        shared = spec.adapter_cls.prepare_shared(config, shapes)
        layers = []
        for path in targets:
            layer = _wrap(model, path)
            in_features, out_features = layer_features(layer.base)
            adapter = spec.adapter_cls(config, in_features, out_features, path, **shared)
            # Adapters train in fp32 on half-precision bases (as PEFT), in the base's dtype otherwise.
            base_dtype = layer.base.weight.dtype
            adapter.to(device=layer.base.weight.device,
                       dtype=base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32)
            adapter.train(model.training)
            layer.add_adapter(name, adapter)
            layers.append(layer)
        if rewrite is not None:
            for layer in layers:
                rewrite(layer, name)
        if from_data is not None:
            from_data.fn(model, name, data, init_options(init_name, getattr(config, "init_options", {})), progress)
        if not (state_from_file and spec.adapter_cls.BASE_STATE_IN_FILE):
            for layer in layers:
                if name in layer.adapters:  # a data-driven init may drop a layer's adapter (EVA rank 0)
                    layer.adapters[name].initialise_from_base(layer.weight_out_in())
    except BaseException:
        undo_inject(model, name, requires_grad)
        raise
    if not any(layer.active for _, layer in adapted_layers(model)):
        set_active(model, [name])
    return model


def requires_grad_flags(model: nn.Module) -> dict[int, bool]:
    return {id(p): p.requires_grad for p in model.parameters()}


def undo_inject(model: nn.Module, name: str, requires_grad: dict[int, bool]) -> None:
    """Leave the model as it was before adapter `name` was injected: W given back where an
    initialiser rewrote it, wrappers removed, `requires_grad` flags (from `requires_grad_flags`) restored."""
    for _, layer in adapted_layers(model):
        restore = getattr(layer.adapters[name], "restore_rewritten_weight", None) if name in layer.adapters else None
        if restore is not None:
            restore(layer)
    delete_adapter(model, name)
    for path, layer in list(adapted_layers(model)):
        if not layer.adapters:  # wrapped just before its adapter's constructor raised
            _replace_module(model, path, layer.base)
    for param in model.parameters():
        param.requires_grad_(requires_grad.get(id(param), param.requires_grad))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (unmerged) from every layer; the base weight is left as it is.
    A layer left without adapters is given back its plain base layer."""
    _require_adapters(model, [name])
    for path, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            layer.remove_adapter(name)
            if not layer.adapters:
                _replace_module(model, path, layer.base)
    configs = dict(adapter_configs(model))
    configs.pop(name)
    object.__setattr__(model, CONFIGS_ATTR, configs)


def _require_adapters(model: nn.Module, names: list[str]) -> None:
    known = adapter_configs(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"no adapter named {missing}; the model has: {sorted(known) or 'none (inject one first)'}")


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly `names` the adapters that take part in forward."""
    names = [names] if isinstance(names, str) else list(names)
    _require_adapters(model, names)
    for _, layer in adapted_layers(model):
        layer.active = [n for n in names if n in layer.adapters]


def active_adapters(model: nn.Module) -> list[str]:
    active: list[str] = []
    for _, layer in adapted_layers(model):
        active.extend(n for n in layer.active if n not in active)
    return active


def merge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Fold the given (default: active) adapters into the base weights."""
    names = active_adapters(model) if names is None else ([names] if isinstance(names, str) else list(names))
    _require_adapters(model, names)
    for _, layer in adapted_layers(model):
        for name in names:
            if name in layer.adapters:
                layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (reverse merge order)."""
    for _, layer in adapted_layers(model):
        for name in reversed(list(layer.merged)):
            layer.unmerge(name)
    return model


def unload(model: nn.Module, merge_active: bool = False) -> nn.Module:
    """Return the plain model: every AdaptedLinear is replaced by its base layer.

    Adapters already merged stay folded into the weights; with ``merge_active=True`` the
    active adapters are merged first. Adapters whose initialiser rewrote W (PiSSA, OLoRA)
    and that are not merged give their principal part back, so the result is the original base.
    """
    if merge_active:
        merge(model)
    for path, layer in list(adapted_layers(model)):
        for adapter in layer.adapters.values():
            restore = getattr(adapter, "restore_rewritten_weight", None)
            if restore is not None and adapter not in [layer.adapters[n] for n in layer.merged]:
                restore(layer)
        _replace_module(model, path, layer.base)
    object.__setattr__(model, CONFIGS_ATTR, {})
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone: merged adapters are taken out for the duration, then put back."""
    layers = [layer for _, layer in adapted_layers(model)]
    was_merged = {id(layer): list(layer.merged) for layer in layers}
    unmerge(model)
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.adapters_disabled = False
            for name in was_merged[id(layer)]:
                layer.merge(name)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of trainable parameters, number of all parameters) of the model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, torch.nn.Parameter]:
    """Named parameters belonging to adapters (all adapters, or the one called `name`)."""
    found = {}
    for path, layer in adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if name is None or adapter_name == name:
                for key, param in adapter.named_parameters():
                    found[f"{path}.adapters.{adapter_name}.{key}"] = param
    return found
