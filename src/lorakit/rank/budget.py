"""The one rank mechanism every rank policy uses: per-module ranks under a global budget, and
parameters that appear or vanish during training with the optimizer and LR scheduler kept consistent.

Rank policies (AdaLoRA, LaMDA++, IncreLoRA, DiffoRA) differ only in *which* module gets how
much rank and *when*; this module owns the bookkeeping they share:

- `RankBudget`: the rank of every module and the global budget (sum of ranks) they live under;
  `set_rank` refuses to exceed the budget or a module's capacity; `rank_pattern()` is what goes
  into a config's `rank_pattern` (PEFT's format for LoRA), `format_rank_table()` what a run prints.
- Parameters that vanish (AdaLoRA's pruned triplets, DiffoRA's dropped modules):
  `remove_parameters(optimizer, params)` takes them out of their param groups and frees their
  optimizer state (Adam's moments are the memory that pruning should give back).
- Parameters that shrink in place (an adapter rebuilt with fewer rows, `AdaLoraAdapter.resize`):
  `replace_parameters(optimizer, {old: (new, dim)}, kept_index)` swaps each old tensor for its
  smaller replacement in the same param group and slices every per-element state tensor
  (exp_avg, exp_avg_sq) the same way, so the kept rows train on with their moments intact.
- Parameters that appear (IncreLoRA's new components): `add_param_group(optimizer, params,
  scheduler=..., step=..., warmup_steps=..., total_steps=...)` adds them as a NEW param group
  with fresh optimizer state and its own schedule: linear warm-up over `warmup_steps` counted from
  `step` (its creation), then linear decay to 0 at `total_steps` (IncreLoRA's "restart warmup").
  Existing groups' learning rates are untouched.
- The SVD-form adapters' orthogonality regulariser (AdaLoRA, IncreLoRA): `orthogonality_penalty`
  and `add_to_training_loss` (the forward-hook body that adds it to training losses only).

How it hooks into torch: any `torch.optim.Optimizer` (or accelerate's wrapper around one, as
transformers.Trainer passes to callbacks) works, since only `param_groups`, `state` and
`add_param_group` are used. The scheduler must be a `torch.optim.lr_scheduler.LambdaLR`, which
is what every `transformers.get_*_schedule_with_warmup` returns (accelerate's wrapper is
unwrapped): LambdaLR keeps one multiplier function and one base lr per param group, so a new
group appends its own function (`lr_lambdas`) and base lr (`base_lrs`) and from then on
`scheduler.step()` moves every group on its own curve. Other schedulers raise, naming LambdaLR.

Plain loop with a growing policy (IncreLoRA-style):

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 10, total)
    for step in range(total):
        loss = model(**batch).loss; loss.backward()
        new_params = policy.maybe_grow(step)            # the policy asks the adapters for new tensors
        if new_params:
            add_param_group(optimizer, new_params, scheduler=scheduler, step=step,
                            warmup_steps=10, total_steps=total)
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from lorakit.core.errors import ConfigError


class RankBudget:
    """The rank of each module under a global budget (the sum of ranks it may not exceed).

    ranks: {module path: rank}; capacity: {module path: largest rank the module can take}
    (default: unbounded); budget: the global budget (default: the sum of the initial ranks).
    """

    def __init__(self, ranks: dict[str, int], budget: int | None = None, capacity: dict[str, int] | None = None):
        self.ranks = dict(ranks)
        self.capacity = dict(capacity or {})
        self.budget = sum(self.ranks.values()) if budget is None else int(budget)
        if self.total > self.budget:
            raise ConfigError(f"initial ranks sum to {self.total}, above the global budget {self.budget}")

    @property
    def total(self) -> int:
        return sum(self.ranks.values())

    @property
    def remaining(self) -> int:
        return self.budget - self.total

    def set_rank(self, module: str, rank: int) -> None:
        if module not in self.ranks:
            raise KeyError(f"no module {module!r} in the budget; known: {sorted(self.ranks)[:4]} ...")
        if rank < 0:
            raise ValueError(f"rank of {module} must be >= 0, got {rank}")
        cap = self.capacity.get(module)
        if cap is not None and rank > cap:
            raise ValueError(f"rank {rank} for {module} exceeds its capacity {cap}")
        if self.total - self.ranks[module] + rank > self.budget:
            raise ValueError(
                f"rank {rank} for {module} would bring the total to {self.total - self.ranks[module] + rank}, "
                f"above the global budget {self.budget}"
            )
        self.ranks[module] = rank

    def grow(self, module: str, by: int = 1) -> None:
        self.set_rank(module, self.ranks[module] + by)

    def rank_pattern(self) -> dict[str, int]:
        """{module path: rank}, as a LoRA config's `rank_pattern` (PEFT matches keys against module paths)."""
        return dict(self.ranks)


def format_rank_table(ranks: dict[str, int], shapes: dict[str, tuple[int, int]] | None = None,
                      budget: int | None = None) -> str:
    """The per-module rank table `lorakit train` prints at the end of a run with a rank policy."""
    shapes = shapes or {}
    width = max([len("module")] + [len(name) for name in ranks])
    lines = [f"{'module':<{width}}  {'in x out':>12}  {'rank':>5}"]
    for name, rank in ranks.items():
        shape = shapes.get(name)
        size = f"{shape[0]}x{shape[1]}" if shape else ""
        lines.append(f"{name:<{width}}  {size:>12}  {rank:>5}")
    total = sum(ranks.values())
    lines.append(f"{'total':<{width}}  {'':>12}  {total:>5}" + (f"  (budget {budget})" if budget is not None else ""))
    return "\n".join(lines)


# --- optimizer / scheduler consistency -------------------------------------------------------

def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (Trainer's callbacks get the wrapper)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def unwrap_scheduler(scheduler):
    inner = getattr(scheduler, "scheduler", None)
    return inner if isinstance(inner, torch.optim.lr_scheduler.LRScheduler) else scheduler


def remove_parameters(optimizer, params: Iterable[nn.Parameter]) -> None:
    """Take `params` out of their param groups and free their optimizer state. Groups left empty
    stay (empty), so scheduler indices stay aligned."""
    optimizer = unwrap_optimizer(optimizer)
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for param in list(optimizer.state):
        if id(param) in gone:
            del optimizer.state[param]


def replace_parameters(optimizer, replaced: dict[nn.Parameter, tuple[nn.Parameter, int]], kept_index: torch.Tensor) -> None:
    """Swap each old parameter for its smaller replacement (same group, same position) and slice its
    optimizer state: every state tensor shaped like the old parameter keeps the entries at
    `kept_index` along the replaced dimension; scalar state (Adam's step) is carried over."""
    optimizer = unwrap_optimizer(optimizer)
    for old, (new, dim) in replaced.items():
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = optimizer.state.pop(old, None)
        if state:
            index = kept_index.to(old.device)
            optimizer.state[new] = {
                key: value.index_select(dim, index).clone()
                if torch.is_tensor(value) and value.shape == old.shape else value
                for key, value in state.items()
            }


def linear_warmup_decay(steps_since_creation: int, warmup_steps: int, remaining_steps: int) -> float:
    """IncreLoRA's restart-warmup multiplier for a group created `remaining_steps` before the end:
    j / W for the j-th step after creation (j < W), then linear decay to 0 at the end of training."""
    j = steps_since_creation
    if j < warmup_steps:
        return j / max(1, warmup_steps)
    return max(0.0, (remaining_steps - j) / max(1, remaining_steps - warmup_steps))


def add_param_group(optimizer, params: list[nn.Parameter], *, scheduler=None, step: int = 0, warmup_steps: int = 0,
                    total_steps: int | None = None, lr: float | None = None,
                    lr_lambda: Callable[[int], float] | None = None, **group_options) -> dict:
    """Add `params` to `optimizer` as a new param group with fresh state and, when `scheduler` is
    given, its own learning-rate curve.

    lr: the group's base lr (default: the first group's base lr, `initial_lr` under a scheduler).
    lr_lambda: multiplier of the base lr as a function of the scheduler's step count; default:
        `linear_warmup_decay(count - step, warmup_steps, total_steps - step)` (restart warm-up), or a
        constant 1 when no `total_steps` is given. `group_options` (weight_decay, ...) go into the group.
    Returns the new group.
    """
    inner = unwrap_optimizer(optimizer)
    if any(p in inner.state for p in params) or any(p is q for g in inner.param_groups for q in g["params"] for p in params):
        raise ValueError("add_param_group: some parameters are already in the optimizer")
    first = inner.param_groups[0]
    base_lr = lr if lr is not None else first.get("initial_lr", first["lr"])
    if lr_lambda is None:
        if total_steps is None:
            lr_lambda = lambda count: 1.0  # noqa: E731
        else:
            created = step
            lr_lambda = lambda count: linear_warmup_decay(count - created, warmup_steps, total_steps - created)  # noqa: E731
    inner.add_param_group({"params": list(params), "lr": base_lr, **group_options})
    group = inner.param_groups[-1]
    if scheduler is not None:
        sched = unwrap_scheduler(scheduler)
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            raise ConfigError(
                f"rank policies that add parameters need a LambdaLR scheduler (every transformers "
                f"get_*_schedule_with_warmup is one); got {type(sched).__name__}"
            )
        group["initial_lr"] = base_lr
        sched.base_lrs.append(base_lr)
        sched.lr_lambdas.append(lr_lambda)
        group["lr"] = base_lr * lr_lambda(sched.last_epoch)
        if hasattr(sched, "_last_lr"):
            sched._last_lr = [g["lr"] for g in inner.param_groups]
    return group


# --- the SVD-form adapters' regulariser (AdaLoRA, IncreLoRA) ------------------------------------

def orthogonality_penalty(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """mean over every (A, B) pair of ||A A^T - I||_F and ||B^T B - I||_F (AdaLoRA's orthogonality
    regulariser, unweighted); A: (r, in), B: (out, r)."""
    total, count = 0.0, 0
    for a, b in factors:
        for cov in (a @ a.T, b.T @ b):
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count if count else torch.zeros(())


def add_to_training_loss(module: nn.Module, output, weight: float, term: Callable[[], torch.Tensor]):
    """Forward-hook body: output.loss += weight * term() in training mode (evaluation losses stay pure)."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if module.training and torch.is_tensor(loss) and weight > 0:
        output["loss"] = loss + weight * term().to(loss.dtype)
    return output
