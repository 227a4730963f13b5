"""IncreLoRA's rank policy: Zhang et al., arXiv 2308.12043; official `RankAllocator` in
FeiyuZhang98/IncreLoRA (`loralib/loralib/increlora.py`). Every module starts at rank init_r; the
modules with the highest importance receive `incre_rank_num` more rank every `incre_interval` steps
until the total rank reaches the budget (target_r x modules, or target_total).

Per module i (dW_i materialised in the forward while the budget is not reached), after each backward:

    S_i   = sum |dW_i * dL/ddW_i| / sqrt(out * in)            module sensitivity
    Ibar  <- beta1 Ibar + (1 - beta1) S_i                      smoothed sensitivity
    Ubar  <- beta2 Ubar + (1 - beta2) |S_i - Ibar|             uncertainty
    score_i = Ibar * Ubar

Schedule, `step(t, optimizer, scheduler)` between backward() and optimizer.step():
1. first call (t = 0): every module gets `incre_rank_num` reserved components (advance learning:
   trainable a, b, e frozen at 1e-5), added to the optimizer as a new param group.
2. while total < budget: update the EMAs; at every t > init_warmup with t % incre_interval == 0, the
   k = min(top_h, ceil(remaining / incre_rank_num)) highest-scoring modules (ties: the earlier module
   in the model) each activate min(incre_rank_num, remaining) reserved components (ranknum grows,
   their e joins the optimizer) and, while budget remains, reserve a fresh set; this round's new
   parameters form ONE new param group with restart warm-up (`lorakit.rank.budget.add_param_group`:
   linear warm-up over `warmup_steps` from its creation, then linear decay to 0 at the last step).
3. total == budget: the scoring hooks are switched off and the unused reserved components are
   removed (parameters and optimizer state; the official code sets their e to 0 and keeps them,
   which computes the same function).

The loss gets  orth_reg_weight * mean over modules of (||A A^T - I||_F, ||B^T B - I||_F)  with A, B
the STACKED components (active and reserved): the paper's AdaLoRA-style orthogonality. The official
`compute_orth_regu` applies the norm to each rank-1 parameter on its own, which only pushes every
vector to unit norm; we follow the paper.

Guards the official code lacks: the last round is capped at the remaining rank (with ties at the
threshold or incre_rank_num > 1 the official selection can overshoot the budget, and then step 3
never runs), ties are broken by module order, and a schedule that cannot reach the budget within
the run is an error naming the fields to change.

Plain loop (the official calling convention: after backward, before optimizer.step):

    policy = IncreLoraAllocator(model, total_steps=T, warmup_steps=W)   # an "increlora" adapter
    for t in range(T):
        model(**batch).loss.backward()              # the regulariser is already in the loss
        policy.step(t, optimizer, scheduler)        # may add param groups to optimizer and scheduler
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    policy.close(optimizer)

With transformers.Trainer: `Trainer(..., callbacks=[IncreLoraAllocator()])` (total steps and
warm-up from the trainer's arguments); `lorakit train --rank-policy increlora` does this.
Resuming a run from a checkpoint is not supported (the checkpoint's ranks differ from the config's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.errors import ConfigError
from lorakit.methods.increlora import IncreLoraAdapter, IncreLoraConfig
from lorakit.rank.budget import (
    RankBudget, add_param_group, add_to_training_loss, orthogonality_penalty, remove_parameters, unwrap_scheduler,
)
from lorakit.rank.policy import RankPolicy, register_rank_policy


@dataclass
class IncreLoraOptions:
    """warmup_steps: restart warm-up length of every added param group; None: the trainer's warm-up
        (`args.get_warmup_steps`), 0 in a plain loop unless given to `attach`.
    weight_decay: weight decay of the added groups; None: that of the optimizer's first group.
    multi_lr: True: each added group gets its own warm-up/decay curve (official `multi_lr`);
        False: added groups follow the first group's schedule.
    adapter_name: the IncreLoRA adapter to grow."""

    warmup_steps: int | None = None
    weight_decay: float | None = None
    multi_lr: bool = True
    adapter_name: str = "default"


def first_round_step(init_warmup: int, incre_interval: int) -> int:
    """The first t > init_warmup with t % incre_interval == 0."""
    return (init_warmup // incre_interval + 1) * incre_interval


@register_rank_policy("increlora", options=IncreLoraOptions)
class IncreLoraAllocator(RankPolicy):
    """IncreLoRA's importance-driven growth of module ranks up to a global budget."""

    method = "increlora"

    def __init__(self, model: nn.Module | None = None, adapter_name: str | None = None,
                 options: IncreLoraOptions | None = None, total_steps: int | None = None,
                 warmup_steps: int | None = None):
        self.options = options or IncreLoraOptions()
        if adapter_name is not None:
            self.options.adapter_name = adapter_name
        self.adapters: dict[str, IncreLoraAdapter] = {}
        self._hook = None
        if model is not None:
            self.attach(model, total_steps, warmup_steps)

    # --- set-up ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, total_steps: int | None = None, warmup_steps: int | None = None) -> None:
        name = self.options.adapter_name
        config, self.adapters = self.required_adapter(model, name, IncreLoraConfig)
        self.config = config
        if any(a.reserved for a in self.adapters.values()):
            raise ConfigError("the IncreLoRA adapter already has reserved components: attach a policy once, to a fresh "
                              "adapter")
        initial = {path: adapter.rank for path, adapter in self.adapters.items()}
        self.budget = config.target_total or config.target_r * len(self.adapters)
        if self.budget < sum(initial.values()):
            raise ConfigError(f"the rank budget {self.budget} is below the initial total rank {sum(initial.values())} "
                              f"({len(initial)} modules); raise target_total / target_r")
        self.ranks = RankBudget(initial, budget=self.budget)
        for path, rank in initial.items():
            config.rank_pattern[path] = rank
        self.rank_step = config.rank_step
        self.total_steps = total_steps
        self.warmup_steps = self.options.warmup_steps if self.options.warmup_steps is not None else (warmup_steps or 0)
        if total_steps is not None:
            self._check_schedule(total_steps)
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.history: list[tuple[int, dict[str, int]]] = []  # (step, {module: rank added})
        self.started = False
        self.done = False
        for adapter in self.adapters.values():
            adapter.scoring = self.ranks.remaining > 0
            adapter.take_score()
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._add_regulariser)

    def rounds_needed(self) -> int:
        """ceil((budget - initial total) / (top_h x incre_rank_num))."""
        return math.ceil(self.ranks.remaining / (self.config.top_h * self.rank_step))

    def _check_schedule(self, total_steps: int) -> None:
        rounds = self.rounds_needed()
        if rounds == 0:
            return
        last = first_round_step(self.config.init_warmup, self.config.incre_interval) + (rounds - 1) * self.config.incre_interval
        if last >= total_steps:
            raise ConfigError(
                f"IncreLoRA needs {rounds} rounds (budget {self.budget}, {len(self.adapters)} modules at rank "
                f"{self.config.init_r}, top_h={self.config.top_h}, incre_rank_num={self.rank_step}); the last would "
                f"run at step {last}, but the run has {total_steps} steps. Lower init_warmup / incre_interval, raise "
                "top_h / incre_rank_num, or train longer"
            )

    def close(self, optimizer=None) -> None:
        """End of training: remove the regulariser hook and, if the budget was not reached, the
        reserved components (their e = 1e-5 terms go; the saved adapter holds the active ones)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.adapters and not self.done:
            self._finish(optimizer)

    # --- the regulariser ---------------------------------------------------------------------------
    def orthogonal_regularizer(self) -> torch.Tensor:
        """mean over every stacked A and B of ||A A^T - I||_F, ||B^T B - I||_F (not yet weighted)."""
        return orthogonality_penalty((a, b) for a, _, b in (adapter.stacked() for adapter in self.adapters.values()))

    def _add_regulariser(self, module, args, output):
        return add_to_training_loss(module, output, self.config.orth_reg_weight, self.orthogonal_regularizer)

    # --- importance ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path, adapter in self.adapters.items():
            score = adapter.take_score()
            if score is None:
                raise RuntimeError(
                    f"{path} has no importance score: call the IncreLoRA policy's step() after backward() and before "
                    "optimizer.step() (Trainer: the policy as a callback does this)"
                )
            ipt = self.exp_avg_ipt.get(path, torch.zeros_like(score))
            unc = self.exp_avg_unc.get(path, torch.zeros_like(score))
            ipt = beta1 * ipt + (1 - beta1) * score
            self.exp_avg_ipt[path] = ipt
            self.exp_avg_unc[path] = beta2 * unc + (1 - beta2) * (score - ipt).abs()

    def scores(self) -> dict[str, float]:
        """score_i = Ibar_i * Ubar_i."""
        values = torch.stack([self.exp_avg_ipt[p] * self.exp_avg_unc[p] for p in self.adapters]).double().cpu().tolist()
        return dict(zip(self.adapters, values))

    # --- the per-step entry point ------------------------------------------------------------------------
    def step(self, global_step: int, optimizer, scheduler=None) -> dict[str, int] | None:
        """Call after backward(), before optimizer.step(). Returns {module: rank added} when this step
        grew ranks. New parameters join `optimizer` as new param groups (with their own schedule on
        `scheduler`, a LambdaLR, when given)."""
        if not self.adapters:
            raise ConfigError("the IncreLoRA policy is not attached to a model: IncreLoraAllocator(model) or attach(model)")
        if self.done:
            return None
        if not self.started:
            self.started = True
            if self.ranks.remaining > 0:
                new = [p for adapter in self.adapters.values() for p in adapter.reserve(self.rank_step)]
                self._new_group(new, optimizer, scheduler, global_step)
        grown = None
        if self.ranks.remaining > 0:
            self.update_importance()
            if global_step > self.config.init_warmup and global_step % self.config.incre_interval == 0:
                grown = self.increase(global_step, optimizer, scheduler)
        if self.ranks.remaining == 0:
            self._finish(optimizer)
        return grown

    @torch.no_grad()
    def increase(self, global_step: int, optimizer, scheduler=None) -> dict[str, int]:
        """One round: the top modules activate their reserved components; returns {module: rank added}."""
        scores = self.scores()
        paths = list(self.adapters)
        k = min(self.config.top_h, math.ceil(self.ranks.remaining / self.rank_step))
        chosen = sorted(range(len(paths)), key=lambda i: (-scores[paths[i]], i))[:k]
        added, new = {}, []
        for i in sorted(chosen):
            path, adapter = paths[i], self.adapters[paths[i]]
            add = min(self.rank_step, self.ranks.remaining)
            self.ranks.grow(path, add)
            new += adapter.activate(add)
            added[path] = add
        if self.ranks.remaining > 0:
            for path in added:
                new += self.adapters[path].reserve(self.rank_step)
        self._new_group(new, optimizer, scheduler, global_step)
        self.history.append((global_step, added))
        return added

    def _new_group(self, params: list[nn.Parameter], optimizer, scheduler, global_step: int) -> None:
        if not params:
            return
        if optimizer is None:
            raise ConfigError("the IncreLoRA policy adds parameters during training: pass the optimizer to step()")
        inner = getattr(optimizer, "optimizer", optimizer)
        weight_decay = self.options.weight_decay
        if weight_decay is None:
            weight_decay = inner.param_groups[0].get("weight_decay", 0.0)
        lr_lambda = None
        if scheduler is not None and not self.options.multi_lr:
            sched = unwrap_scheduler(scheduler)
            lr_lambda = sched.lr_lambdas[0] if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) else None
        total = self.total_steps if scheduler is not None else None
        if scheduler is not None and total is None and lr_lambda is None:
            raise ConfigError("restart warm-up needs the run length: IncreLoraAllocator(model, total_steps=...)")
        add_param_group(optimizer, params, scheduler=scheduler, step=global_step, warmup_steps=self.warmup_steps,
                        total_steps=total, lr_lambda=lr_lambda, weight_decay=weight_decay)

    def _finish(self, optimizer=None) -> None:
        removed = [p for adapter in self.adapters.values() for p in adapter.drop_reserved()]
        if optimizer is not None and removed:
            remove_parameters(optimizer, removed)
        for adapter in self.adapters.values():
            adapter.scoring = False
            adapter.take_score()
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        self.done = True

    def final_ranks(self, model: nn.Module | None = None) -> dict[str, int]:
        return {path: adapter.rank for path, adapter in self.adapters.items()}

    # --- transformers.Trainer --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.adapters:
            self.attach(model, total_steps=state.max_steps, warmup_steps=args.get_warmup_steps(state.max_steps))
        elif self.total_steps is None:  # attached by hand without the run length
            self.total_steps = state.max_steps
            self._check_schedule(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        # Trainer calls this after backward (and gradient clipping), right before optimizer.step();
        # global_step counts the optimizer steps already taken.
        self.step(state.global_step, optimizer, lr_scheduler)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.close(optimizer)
