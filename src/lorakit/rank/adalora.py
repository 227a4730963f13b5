"""AdaLoRA's rank allocator: Zhang et al., arXiv 2303.10512 (ICLR 2023), with PEFT's
`RankAllocator` / `AdaLoraModel.update_and_allocate` (peft/tuners/adalora) as the parity target.

For every trainable entry w of P (lora_B), lambda (lora_E) and Q (lora_A), after each backward:

    I(w)  = |w * dL/dw|                                   sensitivity
    Ibar  <- beta1 Ibar + (1 - beta1) I                    smoothed sensitivity
    Ubar  <- beta2 Ubar + (1 - beta2) |I - Ibar|           uncertainty
    s(w)  = Ibar * Ubar

and the score of triplet i of a module is  S_i = s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki).
The global budget b(t) (number of triplets kept over all modules) follows a cubic schedule:

    b(t) = b0                                                   t <= tinit
    b(t) = bT + (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3   (int), tinit < t < T - tfinal
    b(t) = bT                                                   t >= T - tfinal

with b0 = init_r x modules and bT = target_r x modules. Every deltaT steps of the middle phase
(and once at t = T - tfinal) the b0 - b(t) lowest-scoring triplets are masked (their lambda set to
0, PEFT's `<=` threshold included); after T - tfinal the final mask is re-applied every step.
The loss gets the orthogonality regulariser
    R = orth_reg_weight * mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F.

Differences from PEFT, on purpose:
- Training without the allocator is an error (see `AdaLoraAdapter`), not a silent plain LoRA.
- At t = T - tfinal the pruned triplets are removed for good when the allocator is given the
  optimizer (`prune_at_final=True`, default): their parameters and optimizer state are freed
  (`lorakit.rank.budget.replace_parameters`). PEFT keeps them, zeroed, to the end; their lambda
  still takes gradients there (counted by gradient clipping) and their P, Q still feel the
  regulariser, so late training differs slightly from PEFT's. `prune_at_final=False` keeps PEFT's way.
- The regulariser is added in training mode only (PEFT also adds it to evaluation losses).

Plain loop (PEFT's calling convention: after optimizer.step(), before zero_grad):

    allocator = AdaLoraAllocator(model)            # model holds an "adalora" adapter; total_step in its config
    for step in range(total_step):
        model(**batch).loss.backward()             # the regulariser is already in the loss
        optimizer.step()
        allocator.step(step, optimizer)
        optimizer.zero_grad()

With transformers.Trainer: `Trainer(..., callbacks=[AdaLoraAllocator()])` (total_step is taken
from the trainer's max_steps when the config leaves it None); `lorakit train --method adalora
--rank-policy adalora` does this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.errors import ConfigError
from lorakit.methods.adalora import AdaLoraAdapter, AdaLoraConfig
from lorakit.rank.budget import RankBudget, add_to_training_loss, orthogonality_penalty, replace_parameters
from lorakit.rank.policy import RankPolicy, register_rank_policy


@dataclass
class AdaLoraOptions:
    """prune_at_final: free the pruned triplets (parameters and optimizer state) at t = T - tfinal.
    adapter_name: the AdaLoRA adapter to allocate."""

    prune_at_final: bool = True
    adapter_name: str = "default"


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget, whether to mask at this step): PEFT's `RankAllocator.budget_schedule`."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (mul_coeff**3) + target_budget)
    return budget, step % delta_t == 0


@register_rank_policy("adalora", options=AdaLoraOptions)
class AdaLoraAllocator(RankPolicy):
    """AdaLoRA's importance-driven pruning of singular triplets under a cubic global budget."""

    method = "adalora"

    def __init__(self, model: nn.Module | None = None, adapter_name: str | None = None,
                 options: AdaLoraOptions | None = None, total_step: int | None = None):
        self.options = options or AdaLoraOptions()
        if adapter_name is not None:
            self.options.adapter_name = adapter_name
        self.adapters: dict[str, AdaLoraAdapter] = {}
        self._hook = None
        if model is not None:
            self.attach(model, total_step)

    # --- set-up -----------------------------------------------------------------------------
    def attach(self, model: nn.Module, total_step: int | None = None) -> None:
        name = self.options.adapter_name
        config, self.adapters = self.required_adapter(model, name, AdaLoraConfig)
        self.config = config
        total = config.total_step or total_step
        if total is None:
            raise ConfigError("AdaLoRA needs the run length: set AdaLoraConfig(total_step=...) or pass total_step")
        if config.tinit >= total - config.tfinal:
            raise ConfigError(f"tinit={config.tinit}, tfinal={config.tfinal} leave no budget phase in {total} steps; "
                              "lower tinit/tfinal (--tinit/--tfinal) or train longer")
        config.total_step = total  # saved with the adapter: PEFT's config requires it
        self.init_budget = sum(a.lora_A.shape[0] for a in self.adapters.values())
        self.target_budget = config.target_r * len(self.adapters)
        self.ranks = RankBudget({path: a.rank for path, a in self.adapters.items()}, budget=self.init_budget)
        self.budget = self.init_budget
        self.reset_importance()
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._add_regulariser)
        for adapter in self.adapters.values():
            adapter.allocator_called()

    def reset_importance(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def close(self) -> None:
        """Remove the regulariser hook (the adapters stay as they are)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # --- the regulariser ----------------------------------------------------------------------
    def orthogonal_regularizer(self) -> torch.Tensor:
        """mean over every Q and P of ||Q Q^T - I||_F, ||P^T P - I||_F (not yet weighted)."""
        return orthogonality_penalty((adapter.lora_A, adapter.lora_B) for adapter in self.adapters.values())

    def _add_regulariser(self, module, args, output):
        return add_to_training_loss(module, output, self.config.orth_reg_weight, self.orthogonal_regularizer)

    # --- importance ---------------------------------------------------------------------------
    def _triplet_params(self, adapter: AdaLoraAdapter):
        return (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B), ("lora_E", adapter.lora_E))

    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path, adapter in self.adapters.items():
            for name, param in self._triplet_params(adapter):
                if param.grad is None:
                    raise RuntimeError(
                        f"{path}.{name} has no gradient: call the AdaLoRA allocator after backward() and before "
                        "zero_grad() (PEFT's order: after optimizer.step())"
                    )
                key = (path, name)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(param)
                    self.exp_avg_unc[key] = torch.zeros_like(param)
                self.ipt[key] = (param * param.grad).abs()
                self.exp_avg_ipt[key] = beta1 * self.exp_avg_ipt[key] + (1 - beta1) * self.ipt[key]
                self.exp_avg_unc[key] = beta2 * self.exp_avg_unc[key] + (1 - beta2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per module: s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki), with s = Ibar * Ubar."""
        scores = {}
        for path in self.adapters:
            element = {name: self.exp_avg_ipt[(path, name)] * self.exp_avg_unc[(path, name)]
                       for name in ("lora_A", "lora_B", "lora_E")}
            score_a = element["lora_A"].mean(dim=1, keepdim=True)
            score_b = element["lora_B"].mean(dim=0).view(-1, 1)
            score_ab = torch.cat([score_a, score_b], dim=1).sum(dim=1)
            scores[path] = element["lora_E"].view(-1) + score_ab.view(-1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Mask the init_budget - budget lowest-scoring triplets (all those <= the k-th smallest score)."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else float("-inf")
        for path, adapter in self.adapters.items():
            adapter.set_keep(~(scores[path] <= threshold))
        return self._record()

    def _record(self) -> dict[str, list[bool]]:
        pattern = {f"{path}.lora_E": adapter.rank_mask() for path, adapter in self.adapters.items()}
        self.config.rank_pattern = pattern
        for path, adapter in self.adapters.items():
            self.ranks.set_rank(path, adapter.rank)
        return pattern

    # --- the per-step entry point ----------------------------------------------------------------
    def step(self, global_step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[bool]] | None:
        """PEFT's `update_and_allocate(global_step)`: call after every optimizer.step(), before zero_grad.
        Returns the new rank pattern when the masks changed this step."""
        if not self.adapters:
            raise ConfigError("the AdaLoRA allocator is not attached to a model: AdaLoraAllocator(model) or attach(model)")
        config = self.config
        final_step = config.total_step - config.tfinal
        pattern = None
        if global_step < final_step:
            self.update_importance()
            self.budget, mask_now = budget_schedule(global_step, self.init_budget, self.target_budget, config.tinit,
                                                    config.tfinal, config.total_step, config.deltaT)
            if mask_now:
                pattern = self.mask_to_budget(self.budget)
        elif global_step == final_step:
            self.budget = self.target_budget
            pattern = self.mask_to_budget(self.budget)
            self.reset_importance()
            if self.options.prune_at_final and optimizer is not None:
                self._prune(optimizer)
        else:
            for adapter in self.adapters.values():
                adapter.set_keep(adapter.keep)  # re-zero the pruned singular values (PEFT's mask_using_rank_pattern)
        for adapter in self.adapters.values():
            adapter.allocator_called()
        return pattern

    def _prune(self, optimizer) -> None:
        for adapter in self.adapters.values():
            rows = adapter.keep.nonzero().view(-1)
            if len(rows) < len(adapter.keep):
                replace_parameters(optimizer, adapter.resize(rows), rows)

    def final_ranks(self, model: nn.Module | None = None) -> dict[str, int]:
        return {path: adapter.rank for path, adapter in self.adapters.items()}

    # --- transformers.Trainer ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model, total_step=state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Trainer calls this right after optimizer.step(), before zero_grad; global_step counts earlier steps.
        self.step(state.global_step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
