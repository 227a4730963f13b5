"""`lorakit.prune(model, ratio, data=...)`: LoRA-guided iterative structured pruning (LoRAPrune).

Zhang et al., arXiv 2305.18403; official code aim-uofa/LoRAPrune. The loop, per optimizer step t
of T (one batch each):

1. forward with the current group masks on the outputs of q/k/v (per KV group) and gate/up
   (per channel), loss, backward into the LoRA factors (the base stays frozen);
2. importance of every group from the LoRA gradients (`lorakit.prune.importance`), smoothed
   S <- 0.9 S + 0.1 S_new (skipped when any score is NaN);
3. p(t) from the cubic schedule; every `prune_freq` steps while init_ratio < p(t) <= ratio, each
   prunable layer masks its floor(n * p(t)) lowest-scoring groups (masked groups stay masked);
4. an AdamW step on the LoRA factors (so the LoRA is fine-tuned between mask updates).

Afterwards the LoRA is merged (W <- W + s B A), masked groups are physically removed and the
model's config gets the new num_attention_heads / num_key_value_heads / intermediate_size
(and head_dim, which no longer equals hidden_size / num_attention_heads).

Library decisions (deviations from the official code, which hard-codes 32 multi-head heads):
- grouped-query attention is pruned by **KV groups** (a KV head with its n_rep query heads; its
  score adds the q/o scores of those query heads to the k/v scores of the KV head), so n_rep stays
  valid; with multi-head attention a group is one head, as in the paper;
- mask updates also run when p(t) == ratio, and a last update at `ratio` runs after the loop if a
  layer is still short of it (the official condition p(t) < ratio can stop below the target);
- the paper exempts the first 10% of layers and the last one; a transformers Llama config holds
  one size for all layers, so by default every layer is pruned by the same count
  (`exempt_layers=False`); with `exempt_layers=True` the model is pruned as the paper does and
  works in memory, but cannot be saved as a standard config (saving says so).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.config import require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, adapter_configs, delete_adapter, inject, unload
from lorakit.core.io import atomic_write_json, make_staging_folder, temp_path_for
from lorakit.data import IGNORE_INDEX
from lorakit.init.gradients import batch_loss
from lorakit.prune.importance import (
    METRICS,
    element_importance,
    heads_to_kv_groups,
    module_scores,
    prune_lowest,
    sparsity_at,
)
from lorakit.prune.structure import ATTENTION, FAN_IN, MLP, DecoderGroups, OutputMasks, decoder_groups, prune_layer, update_config

ADAPTER_NAME = "loraprune"
REPORT_NAME = "prune_report.json"


@dataclass
class PruneOptions:
    """Options of `lorakit.prune` (defaults: the official `prune.py`, except `steps`).

    metric: "lora" (LoRAPrune's LoRA-gradient estimate), "magnitude" (|W + s B A|) or "grad"
        (true base-weight gradient, LLM-Pruner-style first-order Taylor; needs full weight gradients).
    steps: optimizer steps T (one batch each, cycling over `data`); default: the number of batches.
    init_ratio, warmup, cooldown: the cubic schedule's p0 and its warm-up / cool-down fractions of T.
    prune_freq: mask updates happen every this many steps.
    ema: weight of the old scores in S <- ema S + (1 - ema) S_new (hard-coded 0.9 in the official code).
    lr, r, alpha, dropout, max_grad_norm: the LoRA fine-tuned alongside (AdamW on q,k,v,o,gate,up,down).
    prune_heads / prune_mlp: which groups to prune (KV groups of attention / MLP channels).
    exempt_layers: never prune the first floor(0.1 L) layers and the last (the paper); the result
        has mixed layer sizes, which a transformers config cannot describe, so it cannot be saved.
    seed: seeds the LoRA initialisation and dropout (the caller's RNG state is restored).
    """

    metric: str = "lora"
    steps: int | None = None
    init_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_freq: int = 10
    ema: float = 0.9
    lr: float = 3e-4
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    max_grad_norm: float = 1.0
    prune_heads: bool = True
    prune_mlp: bool = True
    exempt_layers: bool = False
    seed: int = 0

    def validate(self, ratio: float) -> None:
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ConfigError(f"ratio={ratio!r}: the fraction of groups to prune must be in [0, 1) (e.g. 0.5)")
        require_choice("metric", self.metric, METRICS)
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ConfigError(f"steps={self.steps!r} must be a non-negative integer (or None: one step per batch)")
        require_in_range("init_ratio", self.init_ratio, 0.0, 1.0)
        if self.init_ratio > ratio:
            raise ConfigError(f"init_ratio={self.init_ratio} exceeds ratio={ratio}; the schedule grows from init_ratio to ratio")
        require_in_range("warmup", self.warmup, 0.0, 1.0)
        require_in_range("cooldown", self.cooldown, 0.0, 1.0)
        if self.warmup + self.cooldown >= 1.0:
            raise ConfigError(f"warmup + cooldown = {self.warmup + self.cooldown} must be < 1 so the schedule has a ramp")
        require_positive("prune_freq", self.prune_freq, integer=True)
        require_in_range("ema", self.ema, 0.0, 1.0)
        require_positive("lr", self.lr)
        require_positive("r", self.r, integer=True)
        require_positive("alpha", self.alpha)
        require_in_range("dropout", self.dropout, 0.0, 1.0)
        require_positive("max_grad_norm", self.max_grad_norm)
        if not (self.prune_heads or self.prune_mlp):
            raise ConfigError("prune_heads and prune_mlp are both False: nothing to prune; enable at least one")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[dict]) -> float:
    """exp(mean next-token NLL) over every labelled token (labels != -100) of `batches`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = _on(batch, _device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("perplexity needs batches with labels (token ids where the loss counts, -100 elsewhere)")
    return math.exp(total / count)


class _Importance:
    """The EMA group scores S of every prunable layer, updated from the adapted layers' tensors."""

    def __init__(self, groups: list[DecoderGroups], options: PruneOptions):
        self.groups = [g for g in groups if g.prunable]
        self.options = options
        self.kv = {g.index: torch.zeros(g.n_kv, dtype=torch.float64) for g in self.groups}
        self.channels = {g.index: torch.zeros(g.intermediate, dtype=torch.float64) for g in self.groups}
        self.largest_transient = 0  # bytes of the biggest (out x in) temporaries one module needs

    def _module(self, group: DecoderGroups, name: str) -> torch.Tensor:
        layer = group.module(name)
        adapter = layer.adapters[ADAPTER_NAME]
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
        weight = layer.weight_out_in()
        importance = element_importance(self.options.metric, weight, A.detach(), B.detach(), adapter.scaling,
                                        A.grad, B.grad, layer.base.weight.grad if self.options.metric == "grad" else None)
        self.largest_transient = max(self.largest_transient, 2 * importance.numel() * importance.element_size())
        head_dim = group.head_dim if name in ATTENTION else None
        return module_scores(importance, fan_in=name in FAN_IN, head_dim=head_dim).double().cpu()

    @torch.no_grad()
    def update(self) -> bool:
        """S <- ema S + (1 - ema) S_new for every prunable layer; False (no change) if a score is NaN."""
        new_kv, new_channels = {}, {}
        for group in self.groups:
            if self.options.prune_heads:
                score = self._module(group, "k_proj") + self._module(group, "v_proj")
                for name in ("q_proj", "o_proj"):
                    score = score + heads_to_kv_groups(self._module(group, name), group.n_kv)
                new_kv[group.index] = score
            if self.options.prune_mlp:
                new_channels[group.index] = sum(self._module(group, name) for name in MLP)
        if any(torch.isnan(s).any() for s in [*new_kv.values(), *new_channels.values()]):
            return False
        ema = self.options.ema
        for index, score in new_kv.items():
            self.kv[index] = ema * self.kv[index] + (1 - ema) * score
        for index, score in new_channels.items():
            self.channels[index] = ema * self.channels[index] + (1 - ema) * score
        return True

    def state_bytes(self) -> int:
        return sum(s.numel() * 4 for s in [*self.kv.values(), *self.channels.values()])  # fp32-equivalent

    def apply(self, sparsity: float) -> bool:
        """Mask the floor(n * sparsity) lowest-scoring groups of each prunable layer; True if a mask changed."""
        changed = False
        for group in self.groups:
            for kind, scores, attr in (("heads", self.kv, "kv_mask"), ("mlp", self.channels, "channel_mask")):
                if (kind == "heads" and not self.options.prune_heads) or (kind == "mlp" and not self.options.prune_mlp):
                    continue
                mask = getattr(group, attr)
                n_prune = int(mask.numel() * sparsity)
                if n_prune <= int((mask == 0).sum()):
                    continue
                setattr(group, attr, prune_lowest(scores[group.index], mask.cpu(), n_prune).to(mask.device))
                changed = True
        return changed


def _grad_bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def prune(model: nn.Module | str | os.PathLike | None, ratio: float, data: Iterable[dict] | None = None, *,
          eval_data: Iterable[dict] | None = None, tokenizer=None, out_dir: str | os.PathLike | None = None,
          force: bool = False, progress: bool = True, **options: Any) -> nn.Module:
    """Prune a fraction `ratio` of every layer's KV groups and MLP channels, guided by a LoRA.

    Args:
        model: a Llama-family transformers causal LM without lorakit adapters, or a model spec
            for `lorakit.models.load` (None: the embedded default). Pruned in place.
        ratio: fraction of groups pruned per layer, in [0, 1) (KV groups and MLP channels alike;
            floor(n * ratio) of each are removed).
        data: training batches (dicts with input_ids, attention_mask, labels), as
            `lorakit.inject(..., data=...)` takes; needed unless metric="magnitude" with steps=0.
        eval_data: batches whose perplexity is reported before and after.
        tokenizer: saved next to the model when `out_dir` is given.
        out_dir: write the pruned model (`save_pretrained`, atomically) and prune_report.json here.
        force: replace a non-empty `out_dir`.
        **options: fields of `PruneOptions` (metric, steps, prune_freq, warmup, lr, r, ...).

    Returns:
        The pruned plain transformers model (LoRA merged); its report (dict) is `model.prune_report`.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(PruneOptions)}
    if unknown:
        raise ConfigError(f"unknown prune options {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(PruneOptions)]}")
    opts = PruneOptions(**options)
    opts.validate(ratio)
    if model is None or isinstance(model, (str, os.PathLike)):
        import lorakit.models

        model, loaded_tokenizer = lorakit.models.load(model)
        tokenizer = tokenizer or loaded_tokenizer
    if adapter_configs(model):
        raise ConfigError(f"the model already holds adapters {sorted(adapter_configs(model))}; prune a plain model "
                          "(lorakit.unload(model, merge_active=True) folds a trained adapter in first)")
    batches = list(data) if data is not None else []
    steps = len(batches) if opts.steps is None else opts.steps
    if steps > 0 and not batches:
        raise ConfigError(f"steps={steps} needs training batches: pass data=[{{'input_ids', 'attention_mask', 'labels'}}, ...]")
    if steps == 0 and opts.metric != "magnitude":
        raise ConfigError(f"metric={opts.metric!r} scores groups from gradients: pass data (and steps >= 1), "
                          "or use metric='magnitude' for one-shot pruning without data")
    eval_batches = list(eval_data) if eval_data is not None else None
    start = time.perf_counter()
    groups = decoder_groups(model)
    if opts.exempt_layers:
        for group in groups[: int(0.1 * len(groups))] + groups[-1:]:
            group.prunable = False
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    parameters_before = sum(p.numel() for p in model.parameters())
    say = print if progress else (lambda *a, **k: None)
    ppl_before = perplexity(model, eval_batches) if eval_batches else None
    if ppl_before is not None:
        say(f"lorakit prune: perplexity before {ppl_before:.3f}", flush=True)

    from lorakit.methods.lora import LoraConfig

    device = _device(model)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(opts.seed)
        inject(model, LoraConfig(r=opts.r, alpha=opts.alpha, dropout=opts.dropout, target_modules=list(ATTENTION + MLP)),
               name=ADAPTER_NAME, progress=False)
        try:
            memory = _fine_tune_and_mask(model, groups, batches, steps, ratio, opts, progress)
        except BaseException:  # give the caller back the model as it was
            delete_adapter(model, ADAPTER_NAME)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad.get(name, False))
            raise
    unload(model, merge_active=True)
    for group in groups:
        if group.prunable:
            prune_layer(group)
    uniform = update_config(model, groups)
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, False))
    model.eval()
    ppl_after = perplexity(model, eval_batches) if eval_batches else None
    parameters_after = sum(p.numel() for p in model.parameters())
    report = {
        "method": "loraprune", "ratio": ratio, "steps": steps, "options": dataclasses.asdict(opts),
        "uniform_layers": uniform,
        "kept_heads_per_layer": [g.n_heads for g in groups],
        "kept_kv_heads_per_layer": [g.n_kv for g in groups],
        "kept_channels_per_layer": [g.intermediate for g in groups],
        "kept_kv_groups": memory.pop("kept_kv_groups"),
        "parameters_before": parameters_before, "parameters_after": parameters_after,
        "parameter_fraction_kept": parameters_after / parameters_before,
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "importance_memory": memory, "seconds": round(time.perf_counter() - start, 2),
    }
    model.prune_report = report
    say(f"lorakit prune: {parameters_before:,} -> {parameters_after:,} parameters "
        f"({100 * parameters_after / parameters_before:.1f}%), heads/layer {sorted(set(report['kept_heads_per_layer']))}, "
        f"channels/layer {sorted(set(report['kept_channels_per_layer']))}"
        + (f", perplexity {ppl_before:.3f} -> {ppl_after:.3f}" if eval_batches else ""), flush=True)
    if out_dir is not None:
        save_pruned(model, out_dir, tokenizer=tokenizer, report=report, force=force)
        say(f"lorakit prune: wrote {out_dir}", flush=True)
    return model


def _fine_tune_and_mask(model: nn.Module, groups: list[DecoderGroups], batches: list[dict], steps: int, ratio: float,
                        opts: PruneOptions, progress: bool) -> dict[str, Any]:
    """The LoRAPrune loop (module docstring); returns the importance-memory measurements."""
    device = _device(model)
    layers = [layer for _, layer in adapted_layers(model)]
    lora_params = [p for layer in layers for p in layer.adapters[ADAPTER_NAME].parameters() if p.requires_grad]
    if opts.metric == "grad":
        for layer in layers:
            layer.base.weight.requires_grad_(True)
    scores = _Importance(groups, opts)
    masks = OutputMasks(groups)
    optimizer = torch.optim.AdamW(lora_params, lr=opts.lr, weight_decay=0.0)
    memory: dict[str, Any] = {
        "metric": opts.metric,
        # what an LLM-Pruner-style estimate holds: dL/dW of every pruned projection (fp32)
        "weight_gradient_bytes": sum(layer.base.weight.numel() * 4 for layer in layers),
        "lora_gradient_bytes": sum(p.numel() * p.element_size() for p in lora_params),
    }
    cuda = device.type == "cuda"
    model.train()
    try:
        if steps == 0:  # one-shot magnitude pruning: the scores need no gradients
            scores.update()
        bar = tqdm(range(steps), desc=f"loraprune ({opts.metric})", disable=not progress, leave=False)
        for step in bar:
            if cuda and step == 0:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_memory = torch.cuda.memory_allocated(device)
            loss = batch_loss(model(**_on(batches[step % len(batches)], device)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_params, opts.max_grad_norm)
            if step == 0:
                memory["gradient_bytes_held"] = _grad_bytes(p for layer in layers for p in layer.parameters())
            scores.update()
            if cuda and step == 0:
                memory["cuda_first_step_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base_memory
            sparsity = sparsity_at(step, steps, opts.warmup, opts.cooldown, opts.init_ratio, ratio)
            if step % opts.prune_freq == 0 and opts.init_ratio < sparsity <= ratio:
                scores.apply(sparsity)
            optimizer.step()
            for layer in layers:
                layer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}", sparsity=f"{sparsity:.3f}")
        scores.apply(ratio)  # reach the target even when no update step landed on p(t) == ratio
    finally:
        masks.remove()
        model.eval()
    memory["score_state_bytes"] = scores.state_bytes()
    memory["estimate_transient_bytes"] = scores.largest_transient
    memory["kept_kv_groups"] = [g.kv_mask.nonzero().flatten().tolist() for g in groups]
    return memory


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, report: dict | None = None,
                force: bool = False) -> Path:
    """`save_pretrained` into a temporary sibling folder, then rename it to `out_dir`."""
    out = Path(out_dir)
    groups = decoder_groups_sizes(model)
    if len(groups) != 1:
        raise ConfigError(
            f"decoder layers have different sizes {sorted(groups)} (heads, kv heads, channels); a transformers "
            "config holds one size for all layers, so this model cannot be saved for from_pretrained. "
            "Prune with exempt_layers=False to keep every layer the same size"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists and is not empty; pick a new folder or pass force=True (--force)")
    tmp = make_staging_folder(out, "prune")  # umask permissions (mkdtemp's are 0700); cleaned if we are killed
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            atomic_write_json(tmp / REPORT_NAME, report)
        old = None
        if out.exists():
            old = temp_path_for(out, "old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def decoder_groups_sizes(model: nn.Module) -> set[tuple[int, int, int]]:
    """{(query heads, kv heads, intermediate channels)} over the decoder layers."""
    return {(g.n_heads, g.n_kv, g.intermediate) for g in decoder_groups(model)}
