"""DiffoRA module selection: Jiang, Wang, Yuan, arXiv 2502.08905 ("DiffoRA: Enabling Parameter-Efficient
Fine-Tuning via Differential Module Selection", v2).

DiffoRA decides WHICH modules get a LoRA adapter at all. A "Differential Adaptation Matrix"
Gamma = diag(gamma_1 .. gamma_M), gamma_i in {0, 1}, gates each candidate module's LoRA branch; Gamma is
learned by continuous relaxation, then discretised, with weight sharing between the two stages.

RECONSTRUCTED where marked [recon]: only the abstract is confirmed (no official code, paper body not
retrieved); the search below is first-order DARTS (Liu et al., arXiv 1806.09055), consistent with it.

    search stage (steps 1 .. T):  h_i = W_i x + g_i s B_i A_i x,   g_i = sigmoid(beta_i), beta_i = 0 at start  [recon]
        (a) one optimiser step on {A_i, B_i} on a TRAINING batch, beta fixed (the ordinary training step);
        (b) one Adam step on beta on a HELD-OUT batch, A and B fixed (first-order: no unrolled step) [recon]
    discretisation (after step T):  keep the K = ceil(rho * M) modules with the largest beta_i (ties: model order);
        dropped modules lose their LoRA branch and their parameters leave the optimizer
        (`rank.budget.remove_parameters`); beta is discarded
    weight sharing:  kept modules keep the A_i, B_i searched above, bit for bit, and train on [recon reading]

The gate of a kept module is folded into its scale by default (`fold_gates=True`: alpha_i <- alpha g_i, so
s_i = alpha_i / r and the kept modules compute what they computed during the search, up to fp32 rounding);
`fold_gates=False` resets the gate to 1 (DARTS' discretisation; the kept updates jump by 1 / g_i). Either way
no gate reaches the saved file: the result is ordinary LoRA, with `target_modules`, `rank_pattern` and
`alpha_pattern` naming exactly the kept module paths, which PEFT loads.

Defaults: rho = 0.5 [the paper names a selection ratio; its value was not retrieved];
beta optimiser Adam(lr 3e-4, betas (0.5, 0.999), weight decay 1e-3) = DARTS' architecture optimiser;
search over the first 25% of the run [recon: "a fraction of an epoch"]; 10% of the training examples held
out for the beta steps [recon: DARTS splits its training set; a small slice keeps the final stage's data].
Only a gate's ORDER matters for selection, so DARTS' small lr suffices even for short searches.

Plain loop:

    policy = DiffoRA(DiffoRAOptions(ratio=0.5, search_steps=100), val_batches=held_out_batches)
    config = policy.prepare_config(model, lorakit.LoraConfig(r=8))       # checks the config is plain LoRA
    lorakit.inject(model, config)
    policy.attach(model)                                                 # gates + beta's own Adam
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step in range(total):
        model(**train_batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        policy.step(step, optimizer)     # a beta step on the next held-out batch; discretises after search_steps

With transformers.Trainer: `Trainer(..., callbacks=[DiffoRA(options, val_batches=...)])` (attaches at
on_train_begin, steps at on_step_end, discretises at the latest at on_train_end). `lorakit train
--rank-policy diffora` holds out `val_fraction` of the training examples itself (`hold_out`).

Limits: the search needs plain LoRA factors whose g = 0 means "no update" (DoRA and W-rewriting inits such as
PiSSA are refused); merging or saving DURING the search uses the ungated factors; a Trainer resume across the
discretisation is not supported (the checkpoint holds only the kept modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, adapter_configs
from lorakit.methods.lora import LoraAdapter
from lorakit.rank.budget import RankBudget, remove_parameters
from lorakit.rank.policy import RankPolicy, register_rank_policy


@dataclass
class DiffoRAOptions:
    """ratio: selection ratio rho in (0, 1]; K = ceil(rho * M) of the M candidate modules keep LoRA.
    search_steps: length T of the search stage in optimiser steps (None: ceil(search_fraction x run length)).
    search_fraction: the search stage's share of the run when search_steps is None, in (0, 1].
    gate_lr / gate_betas / gate_weight_decay: Adam on the gate logits beta (DARTS: 3e-4, (0.5, 0.999), 1e-3).
    fold_gates: fold each kept module's last gate into its alpha (True) or reset the gate to 1 (False).
    val_fraction: share of the training examples `hold_out` keeps for the beta steps, in (0, 1).
    adapter_name: the LoRA adapter whose modules are searched."""

    ratio: float = 0.5
    search_steps: int | None = None
    search_fraction: float = 0.25
    gate_lr: float = 3e-4
    gate_betas: tuple[float, float] = (0.5, 0.999)
    gate_weight_decay: float = 1e-3
    fold_gates: bool = True
    val_fraction: float = 0.1
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio!r} is invalid: the selection ratio must lie in (0, 1]")
        steps = self.search_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"search_steps={self.search_steps!r} is invalid: a positive integer (or None)")
        if not 0 < self.search_fraction <= 1:
            raise ConfigError(f"search_fraction={self.search_fraction!r} is invalid: it must lie in (0, 1]")
        if not self.gate_lr > 0:
            raise ConfigError(f"gate_lr={self.gate_lr!r} is invalid: it must be > 0")
        self.gate_betas = tuple(self.gate_betas)
        if len(self.gate_betas) != 2 or not all(0 <= b < 1 for b in self.gate_betas):
            raise ConfigError(f"gate_betas={self.gate_betas!r} is invalid: two numbers in [0, 1)")
        if self.gate_weight_decay < 0:
            raise ConfigError(f"gate_weight_decay={self.gate_weight_decay!r} is invalid: it must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction!r} is invalid: it must lie in (0, 1)")


def kept_count(ratio: float, modules: int) -> int:
    """K = ceil(rho * M), at least 1 (the 1e-9 keeps 0.3 * 10 at 3, not 4)."""
    return max(1, min(modules, math.ceil(ratio * modules - 1e-9)))


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


@register_rank_policy("diffora", options=DiffoRAOptions)
class DiffoRA(RankPolicy):
    """Differentiable module selection for LoRA: gate search, top-K discretisation, weight sharing."""

    method = "lora"

    def __init__(self, options: DiffoRAOptions | None = None, val_batches: Iterable[dict] | None = None,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None):
        self.options = options or DiffoRAOptions()
        self.val_batches = list(val_batches) if val_batches is not None else None
        self.loss_fn = loss_fn or default_loss
        self.model: nn.Module | None = None
        self.paths: list[str] = []
        self.kept: list[str] | None = None  # set by discretise
        self.gate_steps = 0
        self._hooks: list[Any] = []
        self._next_val = 0

    # --- set-up ---------------------------------------------------------------------------------
    def prepare_config(self, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        check_searchable(config)
        return config

    def hold_out(self, examples: list, collate: Callable[[list], dict], batch_size: int, seed: int = 0) -> list:
        """Keep val_fraction of `examples` (seeded draw) as the held-out batches of the beta steps;
        returns the rest, in their order, to train on."""
        n = len(examples)
        n_val = max(1, round(self.options.val_fraction * n))
        if n_val >= n:
            raise ConfigError(f"DiffoRA holds out {n_val} of {n} training examples for its gate steps and would leave "
                              "none to train on; add training data or lower val_fraction")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        val = [examples[i] for i in order[:n_val]]
        self.val_batches = [collate(val[s:s + batch_size]) for s in range(0, n_val, batch_size)]
        return [examples[i] for i in sorted(order[n_val:])]

    def attach(self, model: nn.Module, total_steps: int | None = None) -> None:
        """Gate every LoRA module of the adapter: y = W x + sigmoid(beta_i) s B_i A_i x, beta = 0."""
        name = self.options.adapter_name
        config = adapter_configs(model).get(name)
        if config is None:
            raise ConfigError(f"DiffoRA needs a LoRA adapter named {name!r}; the model has "
                              f"{sorted(adapter_configs(model)) or 'none'}. Inject lorakit.LoraConfig(...) first")
        check_searchable(config)
        self.close()
        self.model, self.config = model, config
        self.adapters: dict[str, LoraAdapter] = {
            path: layer.adapters[name] for path, layer in adapted_layers(model) if name in layer.adapters}
        self.paths = list(self.adapters)
        first = next(iter(self.adapters.values())).lora_A.weight
        self.logits = nn.Parameter(torch.zeros(len(self.paths), device=first.device, dtype=torch.float32),
                                   requires_grad=False)
        self.gate_optimizer = torch.optim.Adam([self.logits], lr=self.options.gate_lr, betas=self.options.gate_betas,
                                               weight_decay=self.options.gate_weight_decay)
        for index, adapter in enumerate(self.adapters.values()):
            self._hooks.append(adapter.lora_B.register_forward_hook(self._gate_hook(index)))
        self.ranks = RankBudget({path: adapter.r for path, adapter in self.adapters.items()})
        self.budget = self.ranks.budget
        self.search_steps = self.options.search_steps
        if self.search_steps is None:
            if total_steps is None:
                raise ConfigError("DiffoRA needs the search length: DiffoRAOptions(search_steps=...) or "
                                  "attach(model, total_steps=...)")
            self.search_steps = max(1, math.ceil(self.options.search_fraction * total_steps))
        self.kept, self.gate_steps, self._next_val = None, 0, 0

    def _gate_hook(self, index: int):
        def hook(module, args, output):  # B (A x) -> g_i B (A x); the adapter multiplies by s afterwards
            return output * torch.sigmoid(self.logits[index]).to(output.dtype)
        return hook

    def close(self) -> None:
        """Remove the gates (the adapters stay as they are)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def gates(self) -> dict[str, float]:
        """{module path: g_i = sigmoid(beta_i)} during the search."""
        return {path: float(g) for path, g in zip(self.paths, torch.sigmoid(self.logits.detach()))}

    # --- search -----------------------------------------------------------------------------------
    def gate_step(self, batch: dict | None = None) -> float:
        """(b): one Adam step on beta minimising the loss on a held-out batch (the next of `val_batches`
        when none is given); A and B are untouched (their values and .grad). Returns the batch's loss."""
        if self.model is None:
            raise ConfigError("DiffoRA is not attached: policy.attach(model) first (Trainer: at on_train_begin)")
        if batch is None:
            if not self.val_batches:
                raise ConfigError("DiffoRA's gate steps need held-out batches: DiffoRA(val_batches=[...]) or "
                                  "policy.hold_out(train_examples, collate, batch_size) (lorakit train does this)")
            batch = self.val_batches[self._next_val % len(self.val_batches)]
            self._next_val += 1
        batch = {key: value.to(self.logits.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        self.logits.requires_grad_(True)
        try:
            loss = self.loss_fn(self.model, batch)
            (grad,) = torch.autograd.grad(loss, [self.logits], allow_unused=True)
        finally:
            self.logits.requires_grad_(False)
        self.logits.grad = torch.zeros_like(self.logits) if grad is None else grad
        self.gate_optimizer.step()
        self.logits.grad = None
        self.gate_steps += 1
        return float(loss.detach())

    def step(self, global_step: int, optimizer=None) -> list[str] | None:
        """Call after every training optimizer step (global_step counts from 0). During the search: a beta
        step; after step search_steps: discretise (dropped parameters leave `optimizer`). Returns the kept
        module paths on the step that discretised."""
        if self.kept is not None:
            return None
        self.gate_step()
        if global_step + 1 >= self.search_steps:
            return self.discretise(optimizer)
        return None

    # --- discretisation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def discretise(self, optimizer=None) -> list[str]:
        """Keep the top K = ceil(rho M) modules by beta; remove the rest (LoRA branch, parameters, optimizer
        state); kept modules keep their searched A, B; the config becomes plain LoRA on the kept paths."""
        if self.model is None:
            raise ConfigError("DiffoRA is not attached: policy.attach(model) first")
        if self.kept is not None:
            return list(self.kept)
        k = kept_count(self.options.ratio, len(self.paths))
        beta = self.logits.detach().cpu().tolist()
        order = sorted(range(len(self.paths)), key=lambda i: (-beta[i], i))
        keep = set(order[:k])
        gates = torch.sigmoid(self.logits.detach()).cpu().tolist()
        self.close()
        name = self.options.adapter_name
        layers = dict(adapted_layers(self.model))
        for index, path in enumerate(self.paths):
            adapter = self.adapters[path]
            if index in keep:
                if self.options.fold_gates:
                    adapter.alpha = adapter.alpha * gates[index]
                    adapter.scaling = self.config.scaling(adapter.r, adapter.alpha)
                continue
            if optimizer is not None:
                remove_parameters(optimizer, list(adapter.parameters()))
            layer = layers[path]
            layer.remove_adapter(name)
            if not layer.adapters:
                parent_path, _, child = path.rpartition(".")
                setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, layer.base)
            self.ranks.set_rank(path, 0)
        self.kept = [path for index, path in enumerate(self.paths) if index in keep]
        self.final_gates = {path: gates[i] for i, path in enumerate(self.paths)}
        self.adapters = {path: self.adapters[path] for path in self.kept}
        self.config.target_modules = list(self.kept)
        self.config.rank_pattern = {path: adapter.r for path, adapter in self.adapters.items()}
        self.config.alpha_pattern = {path: adapter.alpha for path, adapter in self.adapters.items()}
        self.config.validate()
        self.budget = self.ranks.total
        del self.gate_optimizer
        return list(self.kept)

    def final_ranks(self, model: nn.Module | None = None) -> dict[str, int]:
        """{candidate path: rank}; 0 for the modules discretisation dropped."""
        return self.ranks.rank_pattern() if self.paths else {}

    # --- transformers.Trainer -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.model is not model:  # not yet attached by hand
            self.attach(model, total_steps=state.max_steps)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # Trainer calls this after optimizer.step() and zero_grad; global_step counts this step.
        self.step(state.global_step - 1, optimizer)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.kept is None and self.model is not None:  # a run shorter than the search: select now
            self.discretise(optimizer)


def check_searchable(config: AdapterConfig) -> None:
    """DiffoRA gates plain LoRA factors: g = 0 must mean "no update"."""
    if config.method != "lora":
        raise ConfigError(f"rank_policy 'diffora' selects modules of a LoRA adapter; method {config.method!r} is not "
                          "one. Use --method lora (lorakit.LoraConfig)")
    if config.use_dora:
        raise ConfigError("rank_policy 'diffora' cannot gate DoRA (its magnitude rescales W x even with the LoRA "
                          "branch gated off); set use_dora=False")
    if config.init_rewrites_base():
        raise ConfigError(f"rank_policy 'diffora' cannot gate init={config.init!r}: it moved part of W into B A, so a "
                          "gate below 1 would change the base model. Use init='default' or 'gaussian'")
