"""Quantized model folders: integer codes, steps and zero-points in safetensors, plus JSON.

A folder holds
  quantized_model.safetensors  <layer>.qweight (codes as a `bits`-bit little-endian bit stream, uint8),
                               <layer>.scales (float32, out x n_groups), <layer>.zeros (uint8, out x n_groups),
                               modified.<parameter> (full-precision tensors CBQ changed, e.g. norm gains);
  quantize_config.json         format, method, bits, group_size, base model, each layer's shape;
  quant_report.json            what the run measured (losses, outlier counts, seconds).
Everything else comes from the base model. Writes are atomic per file and the config is written last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.core.errors import AdapterFileError, ConfigError
from lorakit.core.io import atomic_save_safetensors, atomic_write_json
from lorakit.quant.cbq import STATE_ATTR, _set_child
from lorakit.quant.quantizer import QuantizedLinear, pack_codes, unpack_codes

WEIGHTS_NAME = "quantized_model.safetensors"
CONFIG_NAME = "quantize_config.json"
REPORT_NAME = "quant_report.json"
FORMAT = "lorakit.quant/1"


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def save_quantized(model: nn.Module, directory: str | os.PathLike, extra_report: dict | None = None) -> Path:
    """Write a model quantized by `lorakit.quantize` to `directory` (created if needed)."""
    state = getattr(model, STATE_ATTR, None)
    layers = quantized_layers(model)
    if state is None or not layers:
        raise ConfigError("the model holds no quantized layers; run lorakit.quantize(model, bits, group_size) first")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        tensors[f"{path}.qweight"] = pack_codes(layer.codes.cpu(), layer.bits)
        tensors[f"{path}.scales"] = layer.scales
        tensors[f"{path}.zeros"] = layer.zeros
    parameters = dict(model.named_parameters())
    for name in state["modified"]:
        tensors[f"modified.{name}"] = parameters[name].detach()
    config = model.config if hasattr(model, "config") else None
    base = getattr(config, "_name_or_path", None) or None
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    atomic_write_json(directory / REPORT_NAME, {**state["report"], **(extra_report or {})})
    atomic_write_json(directory / CONFIG_NAME, {
        "format": FORMAT, "method": state["method"], "bits": state["bits"], "group_size": state["group_size"],
        "base_model_name_or_path": base, "layers": {p: list(l.codes.shape) for p, l in layers.items()},
        "modified": state["modified"],
    })
    return directory


def read_quantize_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{str(directory)!r} holds no {CONFIG_NAME}; point at a folder lorakit quantize wrote")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{path} has format {config.get('format')!r}; this lorakit reads {FORMAT!r}")
    return config


def load_quantized(directory: str | os.PathLike, base_spec: str | os.PathLike | nn.Module | None = None) -> nn.Module:
    """Rebuild a quantized model: the base (a model, or a spec for `lorakit.models.load`; default: the folder's
    base model) with every stored layer replaced by a `QuantizedLinear` from the stored codes. Gives the same
    outputs as the model `lorakit.quantize` returned."""
    directory = Path(directory)
    config = read_quantize_config(directory)
    if isinstance(base_spec, nn.Module):
        model = base_spec
    else:
        import lorakit.models

        spec = base_spec if base_spec is not None else config.get("base_model_name_or_path")
        if spec in (None, lorakit.models.DEFAULT_MODEL_HUB_ID):
            spec = lorakit.models.DEFAULT_MODEL
        model, _ = lorakit.models.load(spec)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    bits, group_size = config["bits"], config["group_size"]
    for path, shape in config["layers"].items():
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise AdapterFileError(f"{directory} quantizes {path!r}, which the base model lacks; "
                                   "pass the base model the folder was made from") from None
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != tuple(shape):
            raise AdapterFileError(f"{path!r} in the base model is not a Linear of shape {tuple(shape)}; "
                                   "pass the base model the folder was made from")
        codes = unpack_codes(tensors[f"{path}.qweight"], bits, tuple(shape)).to(base.weight.device)
        layer = QuantizedLinear(codes, tensors[f"{path}.scales"].to(base.weight.device),
                                tensors[f"{path}.zeros"].to(base.weight.device), bits, group_size,
                                base.bias, base.weight.dtype)
        _set_child(model, path, layer)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in config["modified"]:
            parameters[name].copy_(tensors[f"modified.{name}"])
    report = json.loads((directory / REPORT_NAME).read_text()) if (directory / REPORT_NAME).is_file() else {}
    object.__setattr__(model, STATE_ATTR, {"method": config["method"], "bits": bits, "group_size": group_size,
                                           "modified": config["modified"], "report": report})
    return model
