"""Adapter files: PEFT's on-disk format for methods PEFT has, the same layout for the rest.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
``base_model.model.<module path>.<adapter tensor suffix>`` (PEFT's keys with the adapter name
removed). Writes are atomic (temporary file, then rename); loading never unpickles and never
leaves a partly loaded adapter behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import AdapterFileError, ConfigError
from lorakit.core.inject import adapted_layers, adapter_configs, inject, requires_grad_flags, undo_inject
from lorakit.core.registry import method_for_peft_type, method_spec, weight_initialiser

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
EXTRAS_KEY = "lorakit"  # lorakit-only fields (method, freeze_a, original init), never needed by PEFT
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_folder(out: Path, tag: str, files: Sequence[str]) -> Iterator[Path]:
    """A staging folder next to `out` to write `files` into. When the block succeeds they are moved
    into place: one folder rename when `out` is new or empty, else file by file in the order given
    (put the file readers look for first, the config, last). The staging folder is removed either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file; pass a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        if not out.exists() or not any(out.iterdir()):
            if out.exists():
                out.rmdir()
            os.replace(stage, out)
        else:
            for name in files:
                os.replace(stage / name, out / name)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _task_type(model: nn.Module) -> str | None:
    names = [cls.__name__ for cls in type(model).__mro__]
    if any(n.endswith("ForCausalLM") for n in names):
        return "CAUSAL_LM"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "SEQ_CLS"
    return None


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def adapter_state(model: nn.Module, name: str, for_untouched_base: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` keyed as in the file."""
    tensors = {}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            try:
                own = adapter.file_tensors(for_untouched_base=for_untouched_base)
            except TypeError:
                own = adapter.file_tensors()
            for suffix, tensor in own.items():
                tensors[f"{KEY_PREFIX}{path}.{suffix}"] = tensor
    return tensors


def config_file_dict(model: nn.Module, name: str, for_untouched_base: bool = True) -> dict[str, Any]:
    config = adapter_configs(model)[name]
    targets = [path for path, layer in adapted_layers(model) if name in layer.adapters]
    if hasattr(config, "to_file_dict"):
        data = config.to_file_dict(targets, for_untouched_base=for_untouched_base)
    else:
        data = {"peft_type": None, "lorakit": {"method": config.method}, **config.to_dict()}
    data["task_type"] = _task_type(model)
    data["base_model_name_or_path"] = _base_model_name(model)
    data.setdefault("inference_mode", True)
    return data


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", for_untouched_base: bool = True) -> Path:
    """Write adapter `name` to `directory` (PEFT's layout; created if needed).

    Adapters whose initialiser rewrote W (PiSSA, OLoRA) are written, by default, as an update
    that is exact against the untouched base model (`for_untouched_base=True`); pass False to
    write the raw factors (what a training checkpoint needs, re-applied on load by re-running
    the initialiser, as PEFT does).
    """
    configs = adapter_configs(model)
    if name not in configs:
        raise ConfigError(f"no adapter named {name!r} to save; the model has: {sorted(configs) or 'none'}")
    directory = Path(directory)
    tensors = adapter_state(model, name, for_untouched_base)
    config = config_file_dict(model, name, for_untouched_base)
    metadata = {"format": "pt"}
    if config.get("peft_type"):
        # PEFT warns about unknown config keys; our extras travel in the tensor file's metadata.
        metadata[EXTRAS_KEY] = json.dumps(config.pop(EXTRAS_KEY, {}), sort_keys=True)
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata=metadata)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


def _resolve_folder(directory: Path, name: str) -> Path:
    if not directory.exists():
        raise AdapterFileError(f"adapter folder {str(directory)!r} does not exist")
    if (directory / CONFIG_NAME).exists():
        return directory
    if (directory / name / CONFIG_NAME).exists():  # PEFT puts non-default adapters in sub-folders
        return directory / name
    raise AdapterFileError(
        f"{str(directory)!r} holds no {CONFIG_NAME} (nor {name}/{CONFIG_NAME}); "
        "point at the folder that save_adapter or PEFT's save_pretrained wrote"
    )


def read_adapter_config(directory: str | os.PathLike, name: str = "default") -> tuple[Path, AdapterConfig]:
    folder = _resolve_folder(Path(directory), name)
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{folder / CONFIG_NAME} is not valid JSON ({err})") from None
    if EXTRAS_KEY not in data:
        data[EXTRAS_KEY] = _extras_from_metadata(folder / WEIGHTS_NAME)
    peft_type = data.get("peft_type")
    method = (data.get(EXTRAS_KEY) or {}).get("method")
    spec = method_spec(method) if method else (method_for_peft_type(peft_type) if peft_type else None)
    if spec is None:
        raise AdapterFileError(
            f"{folder / CONFIG_NAME} has peft_type={peft_type!r}, which lorakit cannot load yet"
        )
    if hasattr(spec.config_cls, "from_file_dict"):
        config = spec.config_cls.from_file_dict(data)
    else:
        fields = {k: v for k, v in data.items() if k not in ("peft_type", EXTRAS_KEY, "task_type", "base_model_name_or_path", "inference_mode")}
        config = spec.config_cls.from_dict(fields)
    return folder, config


def _extras_from_metadata(weights: Path) -> dict[str, Any]:
    try:
        with safe_open(str(weights), framework="pt") as handle:
            text = (handle.metadata() or {}).get(EXTRAS_KEY)
    except (SafetensorError, OSError, ValueError):
        return {}  # a missing or corrupt tensor file is reported when the tensors are read
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def read_adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds {pickled[0]}, a pickle file; lorakit never unpickles files (they can run "
                "code). Convert it where you trust it, e.g. in PEFT: "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterFileError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({err}); the file is corrupt or truncated") from None


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    mismatched = [
        f"{key}: file {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(found))
        if found[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:3])}")
    if problems:
        raise AdapterFileError(
            f"{source} does not fit this model: {'; '.join(problems)}. Was it trained on another base "
            "model or with other target_modules / r?"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False) -> nn.Module:
    """Inject the adapter stored in `directory` (ours or PEFT's) under `name` and load its tensors.

    Every key and shape is checked before anything is copied; on any error the model is left
    exactly as it was. With `trainable=False` (default) the adapter's parameters are frozen.
    """
    folder, config = read_adapter_config(directory, name)
    tensors = read_adapter_tensors(folder)
    # Inject without touching W; a W-rewriting initialiser runs only after the file checked out.
    requires_grad = requires_grad_flags(model)
    inject(model, config, name, rewrite_weights=False, state_from_file=True)
    try:
        _check_tensors(_expected_tensors(model, name, tensors), tensors, folder / WEIGHTS_NAME)
    except BaseException:
        undo_inject(model, name, requires_grad)
        raise
    # Files saved with a W-rewriting init (PEFT's default for PiSSA/OLoRA) hold factors relative
    # to W_res: rebuild W_res from this base the way PEFT does, then load the trained factors.
    rewrite = weight_initialiser(getattr(config, "init", None) or "")
    try:
        if rewrite is not None:
            for _, layer in adapted_layers(model):
                if name in layer.adapters:
                    rewrite(layer, name)
        _copy_tensors(model, name, tensors)  # an adapter may still refuse its tensors (LoLDU: another base)
    except BaseException:
        undo_inject(model, name, requires_grad)
        raise
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            for param in layer.adapters[name].parameters():
                param.requires_grad_(trainable and param.requires_grad)
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Copy the tensors of a saved adapter into the already injected adapter `name` (a training
    checkpoint into its own run, say). Keys and shapes are checked before anything is copied."""
    folder = _resolve_folder(Path(directory), name)
    tensors = read_adapter_tensors(folder)
    _check_tensors(_expected_tensors(model, name, tensors), tensors, folder / WEIGHTS_NAME)
    saved = {key: value.clone() for key, value in adapter_state(model, name, for_untouched_base=False).items()}
    try:
        _copy_tensors(model, name, tensors)
    except BaseException:
        _copy_tensors(model, name, saved)  # an adapter refused its tensors part way: put the old ones back
        raise
    return model


def _expected_tensors(model: nn.Module, name: str, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a file for adapter `name` must hold, plus the optional tensors it does hold (PEFT's saved
    VeRA/RandLoRA projections, shared or per layer), which must then fit too."""
    expected = adapter_state(model, name, for_untouched_base=False)
    optional = dict(_shared_buffers(model, name))
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            for suffix, tensor in layer.adapters[name].optional_file_tensors().items():
                optional[f"{KEY_PREFIX}{path}.{suffix}"] = tensor
    expected.update({key: value for key, value in optional.items() if key in found})
    return expected


def _shared_buffers(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Shared tensors a file may carry for adapter `name` (VeRA's projections), keyed as in the file."""
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            return {key: getattr(adapter, attr) for key, attr in adapter.SHARED_KEYS.items()}
    return {}


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    shared = {key: value for key, value in tensors.items() if key in _shared_buffers(model, name)}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            if shared:
                layer.adapters[name].load_shared_tensors(shared)
            prefix = f"{KEY_PREFIX}{path}."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            layer.adapters[name].load_file_tensors(own)
