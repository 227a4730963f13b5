"""`lorakit export`: any adapter as a standard LoRA adapter in PEFT's format, or in vLLM's shape.

`export_adapter(model, adapter_dir, out_dir, rank=R)` (CLI: ``--to lora --rank R``) computes every
adapted layer's update dW in float64 through the one method every family implements,
`Adapter.delta_weight(W)`, measured against the untouched base weight (so adapters whose loading
rewrites W, such as PEFT-style PiSSA files, are exported as the update they really make), and
writes its truncated SVD as a LoRA with r = lora_alpha = R (scale 1; see `lorakit.export.svd`).
The file is lorakit's PEFT LoRA format, so PEFT, vLLM and lorakit load it unchanged. The
relative error ||dW - B A||_F / ||dW||_F of every layer is returned; it is 0 (up to fp32
rounding of the written factors) when rank(dW) <= R.

`for_vllm=True` (``--for vllm``) writes what vLLM's loader accepts (`lorakit.export.vllm`). With a
rank it is the same SVD file (already one rank and one alpha), checked, with a warning when R
exceeds vLLM's default max_lora_rank. Without a rank a LoRA adapter's own factors are copied,
padded to one global rank with each module's own scaling baked into lora_B; adapters that are not
plain LoRA (DoRA, other families) are refused with the command that does work.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from lorakit.core.adapter import Adapter
from lorakit.core.config import AdapterConfig, require_positive
from lorakit.core.errors import AdapterFileError, ConfigError, TargetError
from lorakit.core.inject import (
    adapted_layers,
    adapter_configs,
    delete_adapter,
    find_targets,
    inject,
    requires_grad_flags,
)
from lorakit.core.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter, staged_folder
from lorakit.core.layer import AdaptedLinear, weight_out_in
from lorakit.core.registry import weight_initialiser
from lorakit.export import vllm
from lorakit.export.svd import low_rank_factors, relative_error
from lorakit.methods.lora import LoraConfig

__all__ = ["ExportReport", "adapter_deltas", "export_adapter", "format_report", "load_base_model", "low_rank_factors", "vllm"]

EXACT = 1e-5  # a layer whose relative error is at most this is reported as exact
_SOURCE = "lorakit_export_source"  # adapter names used on the model during an export
_TARGET = "lorakit_export"


@dataclass
class ExportReport:
    """What `export_adapter` wrote: the folder, the LoRA's one rank and alpha, and per layer
    (module path) the relative Frobenius error of the written update against the adapter's."""

    out_dir: Path
    rank: int
    alpha: float
    errors: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def export_adapter(
    model: nn.Module | str | os.PathLike | None,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    for_vllm: bool = False,
    force: bool = False,
    name: str = "default",
    progress: bool = False,
    device: str | torch.device | None = None,
) -> ExportReport:
    """Write the adapter in `adapter_dir` to `out_dir` as a standard LoRA adapter.

    Args:
        model: the base model the adapter was trained on (left as it was afterwards), or a spec
            for `lorakit.models.load` (a folder, .gguf, cached Hub id), or None for the adapter's
            `base_model_name_or_path` when it loads locally, else the embedded default model.
        rank: approximate each layer's dW by its best rank-`rank` LoRA (truncated SVD).
        for_vllm: write only what vLLM accepts; without `rank` the adapter must be a plain LoRA.
        force: overwrite the adapter files of a non-empty `out_dir`.
        name: which adapter of a PEFT folder holding several (sub-folder name).
        progress: show a progress bar over the layers.
        device: where the SVDs run (default: "cuda" when available, else "cpu"); the model and
            the written factors stay where they are.
    """
    if rank is None and not for_vllm:
        raise ConfigError("nothing to export to: pass rank=R (a rank-R LoRA by truncated SVD; CLI --to lora "
                          "--rank R), for_vllm=True (CLI --for vllm), or both")
    if rank is not None:
        require_positive("rank", rank, integer=True)
    out = Path(out_dir)
    _check_destination(out, force)
    folder, config = read_adapter_config(adapter_dir, name)
    if rank is None:
        vllm.refuse_unless_plain_lora(config, Path(adapter_dir))
    notes: list[str] = []
    if model is None or isinstance(model, (str, os.PathLike)):
        model, notes = load_base_model(folder, model)
    try:
        with _adapter_loaded(model, folder, config) as originals, torch.no_grad():
            report = _write_lora(model, config, originals, out, rank, for_vllm, progress, device)
    except AdapterFileError as err:
        if notes:  # the fallback base did not fit: say why that base was used
            raise AdapterFileError(f"{err} ({'; '.join(notes)})") from None
        raise
    report.warnings = notes + (vllm.rank_warnings(report.rank) if for_vllm else [])
    return report


def load_base_model(adapter_folder: str | os.PathLike, spec: str | os.PathLike | None = None) -> tuple[nn.Module, list[str]]:
    """The base model to export against, and notes on how it was chosen: `spec` when given, else
    the adapter's `base_model_name_or_path` if `lorakit.models.load` finds it locally, else the
    embedded default model."""
    from lorakit import models

    if spec is not None:
        return models.load(spec)[0], []
    config_path = Path(adapter_folder) / CONFIG_NAME
    base = json.loads(config_path.read_text()).get("base_model_name_or_path") if config_path.exists() else None
    if not base or base == models.DEFAULT_MODEL_HUB_ID:
        return models.load(None)[0], []
    try:
        return models.load(base)[0], []
    except models.ModelNotFoundError:
        return models.load(None)[0], [
            f"the adapter's base model {base!r} is not available locally, so the embedded default "
            f"{models.DEFAULT_MODEL!r} was used; pass --model (model=...) to name the base"
        ]


def format_report(report: ExportReport, per_layer: bool = True) -> str:
    """The per-layer error table and a summary, as `lorakit export` prints them."""
    lines = []
    if per_layer and report.errors:
        width = max(len("layer"), *(len(path) for path in report.errors))
        lines.append(f"{'layer':<{width}}  relative error")
        lines.extend(f"{path:<{width}}  {error:.3e}" for path, error in report.errors.items())
    worst = max(report.errors, key=report.errors.get) if report.errors else "-"
    verdict = f"exact (<= {EXACT:g})" if report.max_error <= EXACT else f"approximate (> {EXACT:g})"
    lines.append(f"max relative error {report.max_error:.3e} ({worst}): {verdict}")
    lines.append(f"wrote {report.out_dir}: LoRA r={report.rank}, lora_alpha={report.alpha:g}, "
                 f"{len(report.errors)} layers")
    return "\n".join(lines)


# --- the steps -------------------------------------------------------------------------------

def _check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"output folder {str(out)!r} is not empty; choose another folder, or pass --force "
                          "(force=True) to overwrite the adapter files in it")


@contextlib.contextmanager
def _adapter_loaded(model: nn.Module, folder: Path, config: AdapterConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Load the adapter as `_SOURCE`; yield the untouched weights of the layers whose W loading
    rewrites (PEFT-style PiSSA/OLoRA files). Afterwards the model is as it was."""
    merged = [path for path, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise ConfigError(f"the model has adapters merged into {merged[:3]}; pass the plain base model "
                          "(lorakit.unmerge(model) first), since several families' dW depend on W")
    flags = requires_grad_flags(model)
    originals = {}
    # load_adapter rewrites W exactly when the config names a weight initialiser; keep W first.
    if weight_initialiser(getattr(config, "init", None) or "") is not None:
        for path in find_targets(model, config.target_modules):
            originals[path] = weight_out_in(model.get_submodule(path)).clone()
    load_adapter(model, folder, name=_SOURCE)
    try:
        yield originals
    finally:
        with torch.no_grad():
            for path, weight in originals.items():
                weight_out_in(model.get_submodule(path)).copy_(weight)
        for adapter_name in (_TARGET, _SOURCE):
            if adapter_name in adapter_configs(model):
                delete_adapter(model, adapter_name)
        for param in model.parameters():
            param.requires_grad_(flags.get(id(param), param.requires_grad))


def adapter_deltas(model: nn.Module, folder: str | os.PathLike,
                   config: AdapterConfig | None = None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, Adapter]]:
    """(path, untouched W, dW in float64, adapter) for every layer of the adapter saved in `folder`,
    which is loaded on `model` meanwhile; afterwards the model is as it was. dW is measured against
    the untouched base, so it is right for every family (W-dependent ones and PiSSA-style files too)."""
    folder = Path(folder)
    if config is None:
        folder, config = read_adapter_config(folder)
    with _adapter_loaded(model, folder, config) as originals, torch.no_grad():
        for path, layer in adapted_layers(model):
            if _SOURCE in layer.adapters:
                base = originals.get(path, layer.weight_out_in())
                yield path, base, _effective_delta(layer, originals.get(path)), layer.adapters[_SOURCE]


def _delta64(adapter: Adapter, weight: torch.Tensor) -> torch.Tensor:
    """The adapter's dW in float64 (its tensors are cast; the adapter is discarded afterwards)."""
    dtype = next((t.dtype for t in adapter.state_dict().values() if t.is_floating_point()), weight.dtype)
    try:
        return adapter.to(torch.float64).delta_weight(weight.double()).double()
    except RuntimeError:  # state kept outside parameters/buffers stays in its dtype: use that dtype
        return adapter.to(dtype).delta_weight(weight.to(dtype)).double()


def _effective_delta(layer: AdaptedLinear, original: torch.Tensor | None) -> torch.Tensor:
    """dW the adapter makes relative to the untouched base: (W + dW(W)) - W_untouched."""
    weight = layer.weight_out_in()
    delta = _delta64(layer.adapters[_SOURCE], weight)
    if original is not None:
        delta = delta + (weight.double() - original.double())
    return delta


def _lora_target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """The layer names as PEFT and vLLM expect (q_proj, v_proj) when they select exactly `paths`,
    else the full module paths."""
    suffixes = sorted({path.rsplit(".", 1)[-1] for path in paths})
    try:
        if sorted(find_targets(model, suffixes)) == sorted(paths):
            return suffixes
    except TargetError:
        pass
    return sorted(paths)


def _write_lora(model: nn.Module, config: AdapterConfig, originals: dict[str, torch.Tensor], out: Path,
                rank: int | None, for_vllm: bool, progress: bool, device: str | torch.device | None) -> ExportReport:
    layers = [(path, layer) for path, layer in adapted_layers(model) if _SOURCE in layer.adapters]
    if rank is not None:  # truncated SVD: every module gets rank `rank`, scale 1
        global_rank, global_alpha = rank, float(rank)
        svd_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

        def factors(path: str, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            B, A = low_rank_factors(delta.to(svd_device), rank)
            return A, B
    else:  # a plain LoRA's own factors (exact against the untouched base), in vLLM's one-rank shape
        pairs = {}
        for path, layer in layers:
            source = layer.adapters[_SOURCE]
            tensors = source.file_tensors(for_untouched_base=True)
            pairs[path] = (tensors["lora_A.weight"].clone(), tensors["lora_B.weight"].clone(), source.scaling)
        global_rank = max(A.shape[0] for A, _, _ in pairs.values())
        # Keep the config's own scaling as vLLM's one scaling, so unpatterned modules keep B as is.
        global_alpha = config.scaling(config.r, config.alpha) * global_rank

        def factors(path: str, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return vllm.to_global_rank(*pairs[path], global_rank, global_alpha / global_rank)

    global_scale = global_alpha / global_rank  # what PEFT and vLLM compute from r and lora_alpha
    paths = [path for path, _ in layers]
    inject(model, LoraConfig(r=global_rank, alpha=global_alpha, target_modules=_lora_target_modules(model, paths)), _TARGET)
    errors = {}
    for path, layer in tqdm(layers, desc="export", unit="layer", disable=not progress, leave=False):
        delta = _effective_delta(layer, originals.get(path))
        A, B = factors(path, delta)
        target = layer.adapters[_TARGET]
        target.load_file_tensors({"lora_A.weight": A, "lora_B.weight": B})
        written = target.lora_B.weight.double() @ target.lora_A.weight.double()
        errors[path] = relative_error(delta, global_scale * written)
    _publish(model, out, for_vllm)
    return ExportReport(out_dir=out, rank=global_rank, alpha=global_alpha, errors=errors)


def _publish(model: nn.Module, out: Path, for_vllm: bool) -> None:
    """Save `_TARGET` into a staging folder next to `out`, check it, then move it into place: a
    whole-folder rename when `out` is new or empty, else file by file (weights first, config last)."""
    with staged_folder(out, "export", (WEIGHTS_NAME, CONFIG_NAME)) as stage:
        save_adapter(model, stage, name=_TARGET)
        problems = vllm.folder_problems(stage) if for_vllm else []
        if problems:  # the steps above never produce these; a guard against future edits
            raise ConfigError(f"the export would not load in vLLM: {'; '.join(problems)}")
