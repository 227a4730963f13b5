"""`lorakit merge`: several LoRA adapters of one base model into one PEFT LoRA adapter.

    merge_adapters(["math", "code", "sst2"], method="lego", out_dir="merged")

Inputs are LoRA adapter folders, lorakit's or PEFT's, of the same base model; ranks, target
modules, alphas, rank/alpha patterns and rsLoRA may differ between them. Each input's scale s_n
(alpha/r, or alpha/sqrt(r) with rsLoRA, per module) is folded into its B, so every method works
on the updates dW_n = s_n B_n A_n the adapters really make; a module that an input does not
adapt counts as dW_n = 0 there. The output is a plain PEFT LoRA folder with scale 1 (lora_alpha
= r per module; per-module ranks in `rank_pattern`), so PEFT, vLLM (after `lorakit export --for
vllm` when ranks differ) and lorakit load it unchanged, plus `merge_report.json` (method,
inputs, weights, options, and per layer the rank written and two relative Frobenius errors:
against the update the method defines, and against the weighted sum sum_n w_n dW_n).

Methods (`lorakit.merge.baselines`, `lorakit.merge.lego`):

| method | result | default weights | default rank |
|---|---|---|---|
| linear | sum_n w_n dW_n, re-factorised at its exact rank (QR + small SVD) | 1/N | exact |
| cat    | the same sum as concatenated factors [w_1 B_1 .. w_N B_N][A_1; ..; A_N] | 1/N | sum r_n |
| svd    | best rank-R approximation of that sum | 1/N | max r_n |
| ties   | TIES-Merging of the dense dW_n (trim to `density`=0.2, elect sign, disjoint mean), rank-R SVD | 1 | sum r_n |
| dare   | DARE drop-and-rescale (`density`=0.1, i.e. the paper's p=0.9) + weighted sum, rank-R SVD | 1/N | sum r_n |
| lego   | LoRA-LEGO: k-means of rank-1 units to k=R clusters, dual reweighting | 1 | max r_n |

Weights are the task-arithmetic coefficients, applied to each dW_n (so negative weights subtract
an adapter exactly); TIES and LoRA-LEGO already average, hence their default of 1.

DoRA inputs: a DoRA update dW = (m/n - 1) W + (m/n) s B A (n = row norms of W + s B A) rescales
W's rows, so it is not low rank and no plain LoRA holds it. `linear` and `cat` still merge DoRA
(and DoRA with LoRA) exactly, as a DoRA adapter, given the base model (`model=`): with
D_n = diag(m_n / n_n) (identity for a plain LoRA) and c = 1 + sum_n w_n (D_n - 1),

    W + sum_n w_n dW_n = C (W + C^-1 sum_n w_n D_n s_n B_n A_n),   C = diag(c),

which is DoRA with B' = C^-1 [w_n D_n s_n B_n]_n, A' = [A_n]_n, scale 1 and magnitude
m' = c * ||W + B' A'||_rows. Rows with c = 0 are refused. The approximate methods (svd, ties,
dare, lego) refuse DoRA inputs: merge with `linear` first, or `lorakit export --to lora --rank R`
each DoRA adapter (an SVD of its update, error reported) and merge those.

Refused as well: adapter families other than LoRA (export them to LoRA first), PiSSA/OLoRA files
saved relative to a rewritten base (save them for the untouched base), biases, embeddings.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lorakit.core.config import require_choice, require_positive
from lorakit.core.errors import AdapterFileError, ConfigError
from lorakit.core.io import (
    CONFIG_NAME,
    EXTRAS_KEY,
    KEY_PREFIX,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_json,
    read_adapter_config,
    read_adapter_tensors,
    staged_folder,
)
from lorakit.export.svd import relative_error
from lorakit.merge import baselines
from lorakit.merge.lego import FEATURES, NORMS, lego_factors
from lorakit.methods.lora import LoraConfig

__all__ = ["METHODS", "MergeReport", "format_report", "merge_adapters"]

METHODS = ("lego", "linear", "cat", "svd", "ties", "dare")
REPORT_NAME = "merge_report.json"
_OPTIONS = {  # method -> its options and their defaults (None: computed per module, see the table)
    "linear": {"tolerance": 1e-10},
    "cat": {},
    "svd": {"rank": None},
    "ties": {"rank": None, "density": 0.2, "sign_method": "total"},
    "dare": {"rank": None, "density": 0.1, "seed": 0},
    "lego": {"rank": None, "iterations": 10, "seed": 0, "param_reweight": True, "output_reweight": True,
             "param_norm": "linf", "feature": "direction"},
}
_AVERAGING = ("ties", "lego")  # methods whose default weights are 1 (they average by themselves)
_EXACT_FOR_DORA = ("linear", "cat")
_REGEX_CHARS = set(".*+?[](){}|\\^$")


@dataclass
class MergeReport:
    """What `merge_adapters` wrote. `layers[path]` = {"rank", "error", "distance_from_sum"}: error is
    relative to the update the method defines (0 up to rounding for linear/cat), distance_from_sum
    relative to sum_n w_n dW_n."""

    out_dir: Path
    method: str
    inputs: list[str]
    weights: list[float]
    options: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    dora: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((layer["error"] for layer in self.layers.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "inputs": self.inputs, "weights": self.weights, "options": self.options,
                "dora": self.dora, "max_error": self.max_error, "warnings": self.warnings, "layers": self.layers}


@dataclass
class _Input:
    folder: Path
    config: LoraConfig
    modules: dict[str, dict[str, torch.Tensor]]  # path -> {"A", "B" (scale folded in), "m" (DoRA) }
    base: str | None
    task_type: str | None


def merge_adapters(adapter_dirs: list[str | os.PathLike], method: str = "linear", weights: list[float] | None = None,
                   out_dir: str | os.PathLike | None = None, *, model: nn.Module | str | None = None, force: bool = False,
                   progress: bool = False, **options: Any) -> MergeReport:
    """Merge the LoRA adapters in `adapter_dirs` with `method` into one PEFT LoRA folder `out_dir`.

    Args:
        method: "linear", "cat", "svd", "ties", "dare" or "lego" (see the module docstring).
        weights: one per adapter (default: 1/N, or 1 for ties and lego).
        out_dir: the output folder (new or empty; the merged adapter plus merge_report.json).
        model: the base model (module or `lorakit.models.load` spec); needed only for DoRA inputs
            (default then: the inputs' base_model_name_or_path if local, else the embedded model).
        force: overwrite the adapter files of a non-empty `out_dir`.
        options: the method's options: rank (svd, ties, dare, lego), density (ties, dare),
            sign_method "total"|"frequency" (ties), seed (dare, lego), tolerance (linear),
            iterations, param_reweight, output_reweight, param_norm "linf"|"l2",
            feature "direction"|"raw" (lego).
    """
    require_choice("method", method, METHODS)
    options = _check_options(method, options)
    if len(adapter_dirs) < 1:
        raise ConfigError("merge needs at least one adapter folder")
    if out_dir is None:
        raise ConfigError("pass out_dir=DIR (CLI --out DIR): the folder the merged adapter is written to")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"output folder {str(out)!r} is not empty; choose another folder, or pass --force "
                          "(force=True) to overwrite the adapter files in it")
    weights = _check_weights(method, weights, len(adapter_dirs))
    inputs = [_read_input(Path(d)) for d in adapter_dirs]
    warnings = _base_warnings(inputs)
    dora = any(inp.config.use_dora for inp in inputs)
    bases: dict[str, torch.Tensor] = {}
    if dora:
        if method not in _EXACT_FOR_DORA:
            named = [str(inp.folder) for inp in inputs if inp.config.use_dora]
            raise ConfigError(
                f"{named} use DoRA, whose update rescales W's rows and is not low rank, so method={method!r} "
                "cannot merge it; use method='linear' or 'cat' (exact, written as DoRA, needs the base model), "
                "or first `lorakit export DIR --to lora --rank R` each DoRA adapter (approximate, error reported)")
        bases = _base_weights(model, inputs)

    paths = list(dict.fromkeys(path for inp in inputs for path in inp.modules))
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for path in tqdm(paths, desc=f"merge ({method})", unit="layer", disable=not progress, leave=False):
        present = [(inp.modules[path], w) for inp, w in zip(inputs, weights) if path in inp.modules]
        _check_shapes(path, [(m["A"].shape[1], m["B"].shape[0]) for m, _ in present], inputs)
        As = [m["A"] for m, _ in present]
        Bs = [m["B"] for m, _ in present]
        ws = [w for _, w in present]
        if dora:
            B, A, magnitude, target, weighted_sum = _merge_dora(method, present, bases[path], options)
            tensors[f"{KEY_PREFIX}{path}.lora_magnitude_vector"] = magnitude.float()
            written = magnitude[:, None] / torch.linalg.norm(bases[path] + B @ A, dim=1, keepdim=True) * (
                bases[path] + B @ A) - bases[path]
            info: dict[str, Any] = {}
        else:
            B, A, target, info = _merge_module(method, As, Bs, ws, options)
            weighted_sum = sum(w * (b @ a) for a, b, w in zip(As, Bs, ws))
            written = B.float().double() @ A.float().double()
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = B.float().contiguous()
        layers[path] = {"rank": A.shape[0], "error": relative_error(target if target is not None else written, written),
                        "distance_from_sum": relative_error(weighted_sum, written), **info}

    report = MergeReport(out_dir=out, method=method, inputs=[str(inp.folder) for inp in inputs], weights=weights,
                         options=options, layers=layers, dora=dora, warnings=warnings)
    config = _output_config(inputs, layers, dora)
    _publish(out, tensors, config, report)
    return report


def format_report(report: MergeReport, per_layer: bool = True) -> str:
    """The per-layer table and a summary, as `lorakit merge` prints them."""
    lines = []
    if per_layer and report.layers:
        width = max(len("layer"), *(len(p) for p in report.layers))
        lines.append(f"{'layer':<{width}}  rank  error      from sum")
        lines.extend(f"{p:<{width}}  {v['rank']:>4}  {v['error']:.3e}  {v['distance_from_sum']:.3e}"
                     for p, v in report.layers.items())
    ranks = sorted({v["rank"] for v in report.layers.values()})
    lines.append(f"method {report.method}, weights {report.weights}, options {report.options}")
    lines.append(f"max relative error {report.max_error:.3e} against the method's own update; ranks {ranks}")
    lines.append(f"wrote {report.out_dir}: {len(report.layers)} layers{' (DoRA)' if report.dora else ''}, "
                 f"report {REPORT_NAME}")
    return "\n".join(lines)


# --- inputs --------------------------------------------------------------------------------------

def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"method={method!r} has no option(s) {unknown}; its options are "
                          f"{sorted(allowed) or 'none'}")
    merged = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    if merged.get("rank") is not None:
        require_positive("rank", merged["rank"], integer=True)
    if "density" in merged:
        density = merged["density"]
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density={density!r} is invalid: it must lie in (0, 1] (the fraction of entries kept)")
    if "sign_method" in merged:
        require_choice("sign_method", merged["sign_method"], baselines.SIGN_METHODS)
    if "param_norm" in merged:
        require_choice("param_norm", merged["param_norm"], NORMS)
    if "feature" in merged:
        require_choice("feature", merged["feature"], FEATURES)
    if "iterations" in merged:
        require_positive("iterations", merged["iterations"], integer=True)
    if "tolerance" in merged and not 0 <= merged["tolerance"] < 1:
        raise ConfigError(f"tolerance={merged['tolerance']!r} is invalid: it must lie in [0, 1)")
    return merged


def _check_weights(method: str, weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 if method in _AVERAGING else 1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ConfigError(f"{len(weights)} weight(s) for {count} adapter(s); pass one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights={weights} must be finite numbers")
    return weights


def _read_input(directory: Path) -> _Input:
    folder, config = read_adapter_config(directory)
    if not isinstance(config, LoraConfig):
        raise ConfigError(
            f"{folder} is a {config.method!r} adapter; merge takes LoRA adapters. Convert it first: "
            f"`lorakit export {folder} --to lora --rank R --out DIR` (its update's truncated SVD, error reported)")
    if config.init_rewrites_base():
        raise ConfigError(
            f"{folder} holds {config.init} factors relative to a rewritten base weight (W - s B0 A0), not an "
            "update of the untouched base; save it for the untouched base (lorakit.save_adapter's default, or "
            "PEFT's path_initial_model_for_weight_conversion) and merge that")
    tensors = read_adapter_tensors(folder)
    data = json.loads((folder / CONFIG_NAME).read_text())
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(f"{folder / WEIGHTS_NAME}: key {key!r} is not a PEFT LoRA key")
        path, _, suffix = key[len(KEY_PREFIX):].partition(".lora_")
        if suffix not in ("A.weight", "B.weight", "magnitude_vector"):
            raise ConfigError(f"{folder}: tensor {key!r} (biases, embeddings, modules_to_save) cannot be merged; "
                              "merge takes LoRA adapters of Linear layers")
        modules.setdefault(path, {})[suffix] = tensor.double()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for path, parts in modules.items():
        if "A.weight" not in parts or "B.weight" not in parts:
            raise AdapterFileError(f"{folder}: layer {path} lacks lora_A or lora_B")
        r, alpha = config.rank_and_alpha(path)
        A, B = parts["A.weight"], parts["B.weight"]
        if A.shape[0] != r or B.shape[1] != r:
            raise AdapterFileError(f"{folder}: layer {path} has rank {A.shape[0]} in the file but r={r} in "
                                   f"{CONFIG_NAME} (rank_pattern?)")
        out[path] = {"A": A, "B": config.scaling(r, alpha) * B}
        if config.use_dora:
            if "magnitude_vector" not in parts:
                raise AdapterFileError(f"{folder}: DoRA layer {path} lacks lora_magnitude_vector")
            out[path]["m"] = parts["magnitude_vector"]
    if not out:
        raise AdapterFileError(f"{folder / WEIGHTS_NAME} holds no LoRA layers")
    return _Input(folder, config, out, data.get("base_model_name_or_path"), data.get("task_type"))


def _base_warnings(inputs: list[_Input]) -> list[str]:
    bases = sorted({inp.base for inp in inputs if inp.base})
    if len(bases) > 1:
        return [f"the adapters name different base models {bases}; merging assumes one base (shapes agree)"]
    return []


def _check_shapes(path: str, shapes: list[tuple[int, int]], inputs: list[_Input]) -> None:
    if len(set(shapes)) > 1:
        raise AdapterFileError(f"layer {path} has different shapes (in, out) in the adapters: {shapes}; "
                               "were they trained on different base models?")


def _base_weights(model: nn.Module | str | None, inputs: list[_Input]) -> dict[str, torch.Tensor]:
    """W (out, in) in float64 of every module a DoRA merge touches."""
    if model is None or isinstance(model, (str, os.PathLike)):
        from lorakit.export import load_base_model

        model = load_base_model(inputs[0].folder, model)[0]
    weights = {}
    for path in dict.fromkeys(p for inp in inputs for p in inp.modules):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AdapterFileError(f"the base model has no module {path!r}; pass the adapters' base model (model=...)") from None
        base = getattr(module, "base", module)  # an AdaptedLinear's frozen layer
        weight = base.weight.detach()
        weights[path] = (weight if isinstance(base, nn.Linear) else weight.T).double().cpu()
    return weights


# --- merging one module ----------------------------------------------------------------------------

def _merge_module(method: str, As, Bs, ws, options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """(B, A, the method's own dense update or None when it is B A by definition, extra info)."""
    max_rank = max(A.shape[0] for A in As)
    sum_rank = sum(A.shape[0] for A in As)
    if method == "cat":
        B, A = baselines.cat(As, Bs, ws)
        return B, A, sum(w * (b @ a) for a, b, w in zip(As, Bs, ws)), {}
    if method == "linear":
        B, A = baselines.linear(As, Bs, ws, options["tolerance"])
        return B, A, sum(w * (b @ a) for a, b, w in zip(As, Bs, ws)), {}
    if method == "svd":
        rank = options["rank"] or max_rank
        B, A = baselines.svd(As, Bs, ws, rank)
        return B, A, sum(w * (b @ a) for a, b, w in zip(As, Bs, ws)), {}
    if method == "ties":
        target = baselines.ties_delta([b @ a for a, b in zip(As, Bs)], ws, options["density"], options["sign_method"])
        B, A = baselines.low_rank_factors(target, options["rank"] or sum_rank)
        return B, A, target, {}
    if method == "dare":
        target = baselines.dare_delta([b @ a for a, b in zip(As, Bs)], ws, options["density"], options["seed"])
        B, A = baselines.low_rank_factors(target, options["rank"] or sum_rank)
        return B, A, target, {}
    B, A, info = lego_factors(As, [w * b for b, w in zip(Bs, ws)], options["rank"] or max_rank,
                              iterations=options["iterations"], seed=options["seed"],
                              param_reweight=options["param_reweight"], output_reweight=options["output_reweight"],
                              param_norm=options["param_norm"], feature=options["feature"])
    return B, A, None, info


def _merge_dora(method: str, present, W: torch.Tensor, options):
    """Exact DoRA merge of one module (see the module docstring): (B', A', m', target dW, sum dW)."""
    c = torch.ones(W.shape[0], dtype=W.dtype)
    scaled_Bs, As, target = [], [], torch.zeros_like(W)
    for module, w in present:
        A, B = module["A"], module["B"]
        if "m" in module:
            D = module["m"] / torch.linalg.norm(W + B @ A, dim=1)
        else:
            D = torch.ones_like(c)
        c = c + w * (D - 1)
        target += w * ((D - 1)[:, None] * W + D[:, None] * (B @ A))
        scaled_Bs.append(D[:, None] * B)
        As.append(A)
    if (c.abs() < 1e-6).any():
        rows = torch.nonzero(c.abs() < 1e-6).flatten().tolist()
        raise ConfigError(f"the weighted DoRA merge scales rows {rows[:5]} of W by 0 (c = 1 + sum w (m/n - 1)); "
                          "no DoRA adapter represents that: change the weights")
    weights = [w for _, w in present]
    Bs = [B / c[:, None] for B in scaled_Bs]
    B, A = baselines.cat(As, Bs, weights) if method == "cat" else baselines.linear(As, Bs, weights, options["tolerance"])
    B, A = B.float().double(), A.float().double()  # the magnitude must fit the factors as stored
    magnitude = c * torch.linalg.norm(W + B @ A, dim=1)
    return B, A, magnitude, target, target


# --- output ------------------------------------------------------------------------------------------

def _target_modules(inputs: list[_Input], paths: list[str]) -> list[str]:
    """The union of the inputs' target names when each input names its targets plainly (then
    those names select exactly the merged layers), else the full module paths."""
    names = []
    for inp in inputs:
        targets = inp.config.target_modules
        if isinstance(targets, str) or any(_REGEX_CHARS & set(t) - {"."} for t in targets):
            return sorted(paths)
        names.extend(targets)
    return sorted(set(names))


def _output_config(inputs: list[_Input], layers: dict[str, dict[str, Any]], dora: bool) -> dict[str, Any]:
    ranks = [layer["rank"] for layer in layers.values()]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r))
    pattern = {path: layer["rank"] for path, layer in layers.items() if layer["rank"] != common}
    config = LoraConfig(r=common, alpha=float(common), target_modules=_target_modules(inputs, list(layers)),
                        use_dora=dora, rank_pattern=pattern, alpha_pattern={k: float(v) for k, v in pattern.items()})
    data = config.to_file_dict(list(layers))
    bases = [inp.base for inp in inputs if inp.base]
    task_types = [inp.task_type for inp in inputs if inp.task_type]
    data["base_model_name_or_path"] = bases[0] if bases else None
    data["task_type"] = task_types[0] if task_types else None
    data["inference_mode"] = True
    return data


def _publish(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], report: MergeReport) -> None:
    """Write the adapter and the report into a staging folder next to `out`, then move them into
    place: a whole-folder rename when `out` is new or empty, else file by file (config last)."""
    with staged_folder(out, "merge", (WEIGHTS_NAME, REPORT_NAME, CONFIG_NAME)) as stage:
        extras = config.pop(EXTRAS_KEY, {})
        extras["merge"] = {"method": report.method, "report": REPORT_NAME}
        atomic_save_safetensors(stage / WEIGHTS_NAME, tensors,
                                metadata={"format": "pt", EXTRAS_KEY: json.dumps(extras, sort_keys=True)})
        atomic_write_json(stage / REPORT_NAME, report.to_dict())
        atomic_write_json(stage / CONFIG_NAME, config)
