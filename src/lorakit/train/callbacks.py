"""Training-time schedules: each is a plain helper for a custom PyTorch loop plus a thin
`transformers.TrainerCallback` around it, so both share one implementation.

LaMDA's progressive freezing of B (arXiv 2406.12832; official code: ArminAzizi98/LaMDA,
custom_trainer.py `gradual_freeze_B`). For the t-th optimizer step (t = 1, 2, ...), columns
0..n(t)-1 of every LaMDA adapter's B are frozen (lowest index first):

    paper-faithful (default):  n(t) = min(r, floor(t * r / E)),   E = freeze_end_step or round(eta * T),
                               so one more column every E / r steps and all r frozen from step E on;
    code_compatible=True:      n(t) = min(r, int(t * G / (eta * T * G))),
                               the official formula with total_iter = t * G micro-steps (T = max_steps,
                               G = gradient accumulation), evaluated in floating point as the code does.

The official code only zeroes the gradient of frozen columns, which does not freeze them under
AdamW (momentum and decoupled weight decay still move them). Here a frozen column is frozen for
real: it takes no gradient (so clipping ignores it, as in the code), its value is copied back
bit for bit after every optimizer step, and once all r columns are frozen B gets
requires_grad=False, its gradient is dropped and its optimizer state is deleted (the memory saving).
Frozen values are kept as a copy of the frozen columns (at most one B per layer, released at full
freeze). Under DDP, B leaving the graph at full freeze needs `ddp_find_unused_parameters=True`,
as in the official code, which sets requires_grad=False the same way.

Plain loop:

    freezer = LamdaFreezer(model, max_steps=T, gradient_accumulation_steps=G)
    for step in range(T):                     # step = optimizer steps already taken
        freezer.begin_step(step, optimizer)   # before the forward passes of this step
        ...forward / backward (G micro-batches)...
        optimizer.step()
        freezer.end_step()                    # right after optimizer.step()
        optimizer.zero_grad()

With transformers.Trainer: `Trainer(..., callbacks=[LamdaFreezeCallback()])`; `lorakit train`
adds it by itself when the method is "lamda" (`training_callbacks`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers
from lorakit.methods.lamda import LamdaAdapter


def lamda_frozen_columns(step: int, rank: int, max_steps: int, *, eta: float = 0.3, freeze_end_step: int | None = None,
                         code_compatible: bool = False, gradient_accumulation_steps: int = 1) -> int:
    """How many leading columns of B the `step`-th optimizer step (1-based) leaves unchanged."""
    if code_compatible:
        total_iter = step * gradient_accumulation_steps
        return min(rank, int(total_iter / (eta * max_steps * gradient_accumulation_steps)))
    end = freeze_end_step if freeze_end_step is not None else max(1, round(eta * max_steps))
    return min(rank, step * rank // end)


class LamdaFreezer:
    """Applies LaMDA's freezing schedule to every LaMDA adapter in `model` (or only `adapter_name`).

    Each adapter's schedule fields (eta, freeze_end_step, code_compatible) come from its config;
    the run length comes from the caller.
    """

    def __init__(self, model: nn.Module, max_steps: int, gradient_accumulation_steps: int = 1,
                 adapter_name: str | None = None):
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise ConfigError(f"max_steps={max_steps!r} must be a positive integer: the schedule is relative to the run length")
        self.adapters: list[LamdaAdapter] = [
            adapter
            for _, layer in adapted_layers(model)
            for name, adapter in layer.adapters.items()
            if isinstance(adapter, LamdaAdapter) and (adapter_name is None or name == adapter_name)
        ]
        if not self.adapters:
            which = "LaMDA adapter" if adapter_name is None else f"LaMDA adapter named {adapter_name!r}"
            raise ConfigError(f"the model has no {which}; inject one with lorakit.inject(model, LamdaConfig(...)) first")
        self.max_steps = max_steps
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self._frozen_values: dict[int, torch.Tensor] = {}  # id(adapter) -> its frozen columns' values

    def frozen_columns(self, adapter: LamdaAdapter, step: int) -> int:
        config = adapter.config
        return lamda_frozen_columns(step, adapter.r, self.max_steps, eta=config.eta, freeze_end_step=config.freeze_end_step,
                                    code_compatible=config.code_compatible,
                                    gradient_accumulation_steps=self.gradient_accumulation_steps)

    @torch.no_grad()
    def begin_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Freeze what the schedule says for the optimizer step after `step` steps already taken.
        Call before that step's forward passes (a resumed run calls it with its resumed step)."""
        for adapter in self.adapters:
            B = adapter.lamda_B
            if not B.requires_grad:  # fully frozen already
                continue
            n = max(adapter.frozen_columns, self.frozen_columns(adapter, step + 1))
            if n == adapter.r:
                self._freeze_fully(adapter, optimizer)
                continue
            if n > 0 and (n != adapter.frozen_columns or id(adapter) not in self._frozen_values):
                self._frozen_values[id(adapter)] = B[:, :n].detach().clone()
            adapter.frozen_columns = n

    @torch.no_grad()
    def end_step(self) -> None:
        """Undo whatever the optimizer step did to frozen columns (momentum, weight decay): call right after it."""
        for adapter in self.adapters:
            values = self._frozen_values.get(id(adapter))
            if values is not None and adapter.lamda_B.requires_grad:
                adapter.lamda_B[:, : values.shape[1]].copy_(values)

    def _freeze_fully(self, adapter: LamdaAdapter, optimizer: torch.optim.Optimizer | None) -> None:
        B = adapter.lamda_B
        self._frozen_values.pop(id(adapter), None)  # no copy kept: with no gradient nothing moves B
        B.requires_grad_(False)
        B.grad = None  # without a gradient, optimizers skip B (no weight decay either)
        adapter.frozen_columns = adapter.r
        if optimizer is not None:
            optimizer.state.pop(B, None)


class LamdaFreezeCallback(TrainerCallback):
    """`LamdaFreezer` driven by transformers.Trainer: the schedule is applied at `on_step_begin`
    (before the step's forward passes; the optimizer comes in the callback kwargs) and frozen
    columns are put back at `on_optimizer_step` (right after `optimizer.step()`)."""

    def __init__(self, adapter_name: str | None = None):
        self.adapter_name = adapter_name
        self.freezer: LamdaFreezer | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.freezer = LamdaFreezer(model, max_steps=state.max_steps,
                                    gradient_accumulation_steps=args.gradient_accumulation_steps,
                                    adapter_name=self.adapter_name)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.freezer.begin_step(state.global_step, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.freezer.end_step()


def training_callbacks(method: str) -> list[TrainerCallback]:
    """The callbacks a method needs during training (LaMDA: its freezing schedule)."""
    return [LamdaFreezeCallback()] if method == "lamda" else []
