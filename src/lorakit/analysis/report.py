"""`lorakit analyze`: intruder dimensions, update spectra, effective ranks and norm limits per layer.

`analyze(source, base, out_dir)` reads either an adapter folder (any lorakit family, or PEFT's
files: each layer's dW comes from `Adapter.delta_weight` against the untouched base, exactly as
`lorakit.export` computes it) or a fully fine-tuned model folder (dW = W_tuned - W_base for every
Linear layer that changed; the output head is left out, as LoRA's "all-linear" leaves it). For each
layer it records (see `lorakit.analysis.spectral` for the definitions):

- the intruder dimensions among the top-k singular vectors of W0 + dW, and the similarities c_j;
- ||dW||_F, ||dW||_2 / ||W0||_2, the effective rank and the 90%-energy rank of dW, and its
  singular values (plotted);
- the layer's adapter rank (from the loaded adapter, so rank_pattern and any adaptive-rank
  resizing show), or None for full fine-tuning;

and for the attention projections (q/k/v) the max-entry norms of X W0^T, X dW^T, X (W0 + dW)^T on a
few held-out prompts of the built-in task, against sqrt(ln L). It writes `report.txt`,
`analysis.json` and `spectra.png` (matplotlib, Agg) into `out_dir` atomically (a staging folder
renamed into place; into an existing folder, each of the three files is replaced atomically and
nothing else there is touched).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from lorakit.analysis.spectral import (
    THRESHOLD,
    TOP_K,
    NormBounds,
    effective_rank,
    energy_rank,
    intruder_similarities,
    norm_bounds,
)
from lorakit.core.config import require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.io import CONFIG_NAME, atomic_write_bytes, atomic_write_json, staged_folder
from lorakit.core.layer import weight_out_in
from lorakit.core.linalg import truncated_svd

REPORT_NAME, JSON_NAME, PLOT_NAME = "report.txt", "analysis.json", "spectra.png"
ATTENTION_SUFFIXES = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
SPECTRUM_KEPT = 64  # singular values of dW kept in the JSON and the plot
NORM_EXAMPLES = 4  # held-out prompts for the norm check


@dataclass
class LayerAnalysis:
    """One layer's numbers (see the module docstring)."""

    name: str
    shape: tuple[int, int]
    rank: int | None  # adapter rank of this layer; None for full fine-tuning
    intruders: list[int]  # 0-based indices among the top-k singular vectors of W0 + dW
    similarities: list[float]  # c_j, j < k
    delta_norm: float  # ||dW||_F
    relative_spectral_norm: float  # ||dW||_2 / ||W0||_2
    effective_rank: float
    energy_rank_90: int
    delta_singular_values: list[float]  # the largest SPECTRUM_KEPT
    norms: dict[str, float] | None = None  # attention projections: the worst prompt's NormBounds

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def analyse_layer(name: str, base_weight: torch.Tensor, tuned_weight: torch.Tensor, rank: int | None = None,
                  top_k: int = TOP_K, threshold: float = THRESHOLD) -> LayerAnalysis:
    """`LayerAnalysis` of one (out, in) weight before and after fine-tuning (float64 SVDs)."""
    W0, Wt = base_weight.detach().double(), tuned_weight.detach().double().to(base_weight.device)
    U0, S0, _ = truncated_svd(W0, min(W0.shape))
    similarity, _ = intruder_similarities(W0, Wt, top_k, base_vectors=U0)
    delta_values = torch.linalg.svdvals(Wt - W0)
    base_norm = float(S0[0])
    return LayerAnalysis(
        name=name, shape=tuple(W0.shape), rank=rank,
        intruders=[int(j) for j in torch.nonzero(similarity < threshold).flatten()],
        similarities=[round(float(c), 6) for c in similarity],
        delta_norm=float(delta_values.square().sum().sqrt()),
        relative_spectral_norm=float(delta_values[0]) / base_norm if base_norm > 0 else math.inf,
        effective_rank=effective_rank(delta_values), energy_rank_90=energy_rank(delta_values, 0.9),
        delta_singular_values=[float(s) for s in delta_values[:SPECTRUM_KEPT]],
    )


@dataclass
class AnalysisReport:
    """What `analyze` found; `to_dict()` is the JSON file."""

    source: str
    base: str
    kind: str  # "adapter" or "full"
    method: str | None  # the adapter family, None for full fine-tuning
    top_k: int
    threshold: float
    layers: list[LayerAnalysis]
    unchanged_layers: int = 0  # full fine-tuning: Linear layers with W_tuned == W_base (skipped)
    notes: list[str] = field(default_factory=list)
    out_dir: Path | None = None

    @property
    def total_intruders(self) -> int:
        return sum(len(layer.intruders) for layer in self.layers)

    def by_kind(self) -> dict[str, dict[str, Any]]:
        """Per module name (q_proj, ...): layers, intruders, mean effective rank, ranks seen."""
        groups: dict[str, list[LayerAnalysis]] = defaultdict(list)
        for layer in self.layers:
            groups[layer.kind].append(layer)
        return {kind: {"layers": len(rows), "intruders": sum(len(r.intruders) for r in rows),
                       "layers_with_intruders": sum(bool(r.intruders) for r in rows),
                       "mean_effective_rank": sum(r.effective_rank for r in rows) / len(rows),
                       "ranks": sorted({r.rank for r in rows if r.rank is not None})}
                for kind, rows in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        normed = [layer.norms for layer in self.layers if layer.norms]
        return {
            "source": self.source, "base": self.base, "kind": self.kind, "method": self.method,
            "top_k": self.top_k, "threshold": self.threshold, "total_intruders": self.total_intruders,
            "layers_with_intruders": sum(bool(layer.intruders) for layer in self.layers),
            "unchanged_layers": self.unchanged_layers, "by_kind": self.by_kind(),
            "norm_check": {"layers": len(normed),
                           "max_rho": max((n["rho"] for n in normed), default=None),
                           "layers_below_threshold": sum(n["rho"] < 1 for n in normed)},
            "notes": self.notes, "layers": [asdict(layer) for layer in self.layers],
        }


# --- reading the updates ---------------------------------------------------------------------

def is_adapter_folder(path: str | os.PathLike, name: str = "default") -> bool:
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path / name / CONFIG_NAME).is_file()


def _tokenizer_of(model: nn.Module):
    """The tokenizer next to the model's files (the embedded default's cache folder for it)."""
    from transformers import AutoTokenizer

    from lorakit import models

    where = getattr(model.config, "_name_or_path", None) or getattr(model.config, "name_or_path", None)
    if where in (models.DEFAULT_MODEL_HUB_ID, models.DEFAULT_MODEL):
        where = models.default_model_folder()
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
    return tokenizer


def _prompts(tokenizer, count: int, max_length: int) -> list[torch.Tensor]:
    """Token ids of `count` held-out examples of the built-in task, one unpadded sequence each."""
    from lorakit.data import default_task, encode, to_example

    return [torch.tensor([encode(tokenizer, to_example(record), max_length)["input_ids"]])
            for record in default_task()[1][:count]]


@torch.no_grad()
def _attention_inputs(model: nn.Module, paths: list[str], prompts: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Inputs (L, in) of the layers at `paths` on each prompt (one forward pass per prompt)."""
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [model.get_submodule(path).register_forward_pre_hook(
        lambda module, args, path=path: captured[path].append(args[0][0].detach().float().cpu()))
        for path in paths]
    device = next(model.parameters()).device
    try:
        for ids in prompts:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _worst_norms(inputs: list[torch.Tensor], base_weight: torch.Tensor, delta: torch.Tensor) -> dict[str, float] | None:
    bounds = [norm_bounds(x, base_weight, delta) for x in inputs if x.shape[0] > 1]
    if not bounds:
        return None
    worst: NormBounds = max(bounds, key=lambda b: b.rho)
    return {"length": worst.length, "gamma_base": worst.gamma_base, "gamma_adapter": worst.gamma_adapter,
            "gamma_effective": worst.gamma_effective, "gamma": worst.gamma, "sqrt_ln_length": worst.log_threshold,
            "rho": worst.rho, "rho_effective": worst.rho_effective}


def _is_attention(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in ATTENTION_SUFFIXES


def _adapter_updates(model: nn.Module, folder: Path, config) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, int | None]]:
    """(path, W0, dW, rank) per adapted layer; the adapter is loaded meanwhile."""
    from lorakit.export import adapter_deltas

    for path, base, delta, adapter in adapter_deltas(model, folder, config):
        rank = getattr(adapter, "r", None)
        if not isinstance(rank, int) and hasattr(config, "rank_and_alpha"):
            rank = config.rank_and_alpha(path)[0]
        yield path, base, delta, rank if isinstance(rank, int) else None


def _full_updates(tuned: nn.Module, base: nn.Module, counter: dict[str, int]
                  ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, None]]:
    from lorakit.core.inject import find_targets

    for path in find_targets(tuned, "all-linear"):
        try:
            base_module = base.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"the base model has no layer {path!r}; pass the model the fine-tuned one started from") from None
        W0, Wt = weight_out_in(base_module), weight_out_in(tuned.get_submodule(path))
        if W0.shape != Wt.shape:
            raise ConfigError(f"layer {path!r} is {tuple(Wt.shape)} in the fine-tuned model but {tuple(W0.shape)} in "
                              "the base; pass the base model it was fine-tuned from")
        if torch.equal(W0, Wt):
            counter["unchanged"] += 1
            continue
        yield path, W0, Wt.double() - W0.double(), None


# --- the tool --------------------------------------------------------------------------------

def analyze(source: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None,
            out_dir: str | os.PathLike | None = None, *, top_k: int = TOP_K, threshold: float = THRESHOLD,
            norm_examples: int = NORM_EXAMPLES, max_length: int = 128, name: str = "default",
            device: str | torch.device | None = None, progress: bool = True,
            log: Callable[[str], None] | None = print) -> AnalysisReport:
    """Analyse the fine-tuned updates in `source` against `base`; write the report to `out_dir`.

    Args:
        source: an adapter folder (lorakit's or PEFT's) or a fully fine-tuned HF model folder.
        base: the base model (a spec for `lorakit.models.load`, or a loaded model). For an adapter,
            None means the adapter's `base_model_name_or_path` when local, else the embedded
            default; a full model needs it.
        out_dir: where report.txt, analysis.json and spectra.png go (None: write nothing).
        top_k, threshold: intruder-dimension k and eps (official code: 10 and 0.5).
        norm_examples: held-out prompts of the built-in task for the norm check (0: skip it).
        device: where the SVDs run (default: cuda when available, else cpu).
    """
    from lorakit import models
    from lorakit.core.io import read_adapter_config
    from lorakit.export import load_base_model

    require_positive("top_k", top_k, integer=True)
    require_in_range("threshold", threshold, 0.0, 1.0, closed_high=True)
    if norm_examples < 0:
        raise ConfigError(f"norm_examples={norm_examples} must be >= 0 (0 skips the norm check)")
    say = log or (lambda line: None)
    svd_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source_path = Path(source)
    notes: list[str] = []
    counter = {"unchanged": 0}
    if is_adapter_folder(source_path, name):
        folder, config = read_adapter_config(source_path, name)
        if isinstance(base, nn.Module):
            model = base
        else:
            say(f"analyze: loading the base model{f' {base}' if base else ''}")
            model, notes = load_base_model(folder, base)
        kind, method = "adapter", config.method
        base_label = str(base) if base is not None and not isinstance(base, nn.Module) else str(
            getattr(model.config, "_name_or_path", "") or "model")
        updates = _adapter_updates(model, folder, config)
        forward_model = model
    elif (source_path / "config.json").is_file():
        if base is None:
            raise ConfigError(f"{source_path} is a full model folder: pass the model it was fine-tuned from "
                              "(--base BASE; base=...) to compare its weights with")
        say(f"analyze: loading {source_path} and the base model")
        tuned = models.load(source_path)[0]
        model = base if isinstance(base, nn.Module) else models.load(base)[0]
        kind, method, base_label = "full", None, str(base) if not isinstance(base, nn.Module) else "model"
        updates = _full_updates(tuned, model, counter)
        forward_model = tuned
    else:
        raise ConfigError(f"{source_path} is neither an adapter folder ({CONFIG_NAME}) nor a model folder "
                          "(config.json); pass the folder that save_adapter / save_pretrained wrote")

    layers = []
    try:
        first = next(updates, None)  # loads the adapter, so the norm check's forward passes see it
        if first is None:
            raise ConfigError(f"{source_path} changes no Linear layer of the base model: nothing to analyse")
        inputs = _norm_inputs(forward_model, norm_examples, max_length, notes, say) if norm_examples else {}
        bar = tqdm(desc="analyze", unit="layer", disable=not progress, leave=False)
        for path, W0, delta, rank in itertools.chain([first], updates):
            W0, delta = W0.double().to(svd_device), delta.double().to(svd_device)
            layer = analyse_layer(path, W0, W0 + delta, rank, top_k, threshold)
            if path in inputs:
                layer.norms = _worst_norms(inputs[path], W0, delta)
            layers.append(layer)
            bar.update()
        bar.close()
    finally:
        updates.close()  # unloads the adapter: the base model is left as it was
    report = AnalysisReport(source=str(source_path), base=base_label, kind=kind, method=method, top_k=top_k,
                            threshold=threshold, layers=layers, unchanged_layers=counter["unchanged"], notes=notes)
    if out_dir is not None:
        report.out_dir = write_report(report, out_dir)
    return report


def _norm_inputs(model: nn.Module, count: int, max_length: int, notes: list[str],
                 say: Callable[[str], None]) -> dict[str, list[torch.Tensor]]:
    """Inputs of every attention projection on `count` prompts (the model with the update applied)."""
    from lorakit.core.inject import adapted_layers, find_targets

    tokenizer = _tokenizer_of(model)
    if tokenizer is None:
        notes.append("norm check skipped: no tokenizer found next to the model's files")
        return {}
    adapted = [path for path, _ in adapted_layers(model)]
    candidates = adapted or find_targets(model, "all-linear")
    paths = [path for path in candidates if _is_attention(path)]
    if not paths:
        notes.append("norm check skipped: no q/k/v attention projection among the analysed layers")
        return {}
    say(f"analyze: norm check on {count} held-out prompts of the built-in task")
    return _attention_inputs(model, paths, _prompts(tokenizer, count, max_length))


# --- writing ---------------------------------------------------------------------------------

def format_report(report: AnalysisReport, per_layer: bool = True) -> str:
    """The text report: summary, per module kind, then (per_layer) one row per layer."""
    source = f"{report.kind} fine-tuning" if report.kind == "full" else f"{report.method} adapter"
    lines = [f"lorakit analyze: {report.source} ({source}) against {report.base}",
             f"intruder dimensions (top-{report.top_k} singular vectors, cosine threshold {report.threshold:g}): "
             f"{report.total_intruders} in {sum(bool(l.intruders) for l in report.layers)} of {len(report.layers)} layers"]
    if report.unchanged_layers:
        lines.append(f"({report.unchanged_layers} Linear layers unchanged by fine-tuning, not listed)")
    kinds = report.by_kind()
    lines.append("")
    lines.append(f"{'module':<10} {'layers':>6} {'intruders':>9} {'with any':>8} {'mean eff. rank':>14}  ranks")
    for kind, row in kinds.items():
        ranks = ",".join(map(str, row["ranks"])) or "full"
        lines.append(f"{kind:<10} {row['layers']:>6} {row['intruders']:>9} {row['layers_with_intruders']:>8} "
                     f"{row['mean_effective_rank']:>14.2f}  {ranks}")
    normed = [layer for layer in report.layers if layer.norms]
    if normed:
        worst = max(normed, key=lambda layer: layer.norms["rho"])
        below = sum(layer.norms["rho"] < 1 for layer in normed)
        lines += ["", f"norm limits (arXiv 2406.03136): Gamma = max(max|X W0^T|, max|X dW^T|) vs sqrt(ln L), "
                      f"rho = Gamma / sqrt(ln L); {below} of {len(normed)} q/k/v layers have rho < 1; "
                      f"worst {worst.name}: Gamma {worst.norms['gamma']:.2f}, L {worst.norms['length']}, "
                      f"rho {worst.norms['rho']:.2f} (asymptotic theory: a diagnostic, not a guarantee)"]
    if per_layer:
        width = max(len("layer"), *(len(layer.name) for layer in report.layers))
        lines += ["", f"{'layer':<{width}} {'shape':>11} {'rank':>5} {'intruders':>12} {'min c':>6} "
                      f"{'eff.rank':>8} {'rank90':>6} {'|dW|_F':>9} {'|dW|2/|W|2':>10} {'rho':>6}"]
        for layer in report.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            intruders = ",".join(map(str, layer.intruders)) or "-"
            rho = f"{layer.norms['rho']:.2f}" if layer.norms else "-"
            lines.append(f"{layer.name:<{width}} {shape:>11} {layer.rank if layer.rank is not None else 'full':>5} "
                         f"{intruders:>12} {min(layer.similarities):>6.3f} {layer.effective_rank:>8.2f} "
                         f"{layer.energy_rank_90:>6} {layer.delta_norm:>9.3e} {layer.relative_spectral_norm:>10.3e} {rho:>6}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def plot_spectra(report: AnalysisReport, path: Path) -> None:
    """Top row: singular values of dW (normalised by the largest) per module kind, one line per
    layer coloured by depth; bottom row: the similarities c_j with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[LayerAnalysis]] = defaultdict(list)
    for layer in report.layers:
        groups[layer.kind].append(layer)
    figure, axes = plt.subplots(2, len(groups), figsize=(3.2 * len(groups), 6), squeeze=False)
    colours = plt.get_cmap("viridis")
    for column, (kind, rows) in enumerate(groups.items()):
        top, bottom = axes[0][column], axes[1][column]
        for index, layer in enumerate(rows):
            colour = colours(index / max(len(rows) - 1, 1))
            values = torch.tensor(layer.delta_singular_values)
            if values.numel() and values[0] > 0:
                top.semilogy(range(1, len(values) + 1), (values / values[0]).clamp_min(1e-12), color=colour, lw=0.8)
            bottom.plot(range(1, len(layer.similarities) + 1), layer.similarities, color=colour, lw=0.8, marker=".")
        top.set_title(f"{kind} ({len(rows)} layers)")
        top.set_xlabel("i")
        top.set_ylabel("sigma_i(dW) / sigma_1(dW)")
        bottom.axhline(report.threshold, color="red", ls="--", lw=0.8)
        bottom.set_ylim(0, 1.02)
        bottom.set_xlabel("j (singular vector of W0 + dW)")
        bottom.set_ylabel("max_i |cos(u_t,j, u_0,i)|")
    figure.suptitle(f"{Path(report.source).name}: dW spectra and intruder similarities (colour: depth)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(report: AnalysisReport, out_dir: str | os.PathLike) -> Path:
    """Write report.txt, analysis.json and spectra.png into `out_dir` atomically (see the module docstring)."""
    out = Path(out_dir)
    with staged_folder(out, "analyze", (PLOT_NAME, REPORT_NAME, JSON_NAME)) as stage:
        report.out_dir = out
        atomic_write_bytes(stage / REPORT_NAME, (format_report(report) + "\n").encode())
        atomic_write_json(stage / JSON_NAME, report.to_dict())
        plot_spectra(report, stage / PLOT_NAME)
    return out
