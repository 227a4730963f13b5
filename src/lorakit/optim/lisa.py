"""LISA: Layerwise Importance Sampled AdamW (Pan et al., NeurIPS 2024, arXiv 2403.17919).

A training schedule, not an adapter. The model's decoder blocks ell = 0..N_L-1 (e.g.
`model.model.layers`) are split into periods of K optimizer steps; in period i = floor(t / K) only
the sampled blocks S_i train and every other block is frozen:

    code (default, LMFlow's DynamicLayerActivationCallback):  S_i = gamma distinct indices drawn
        uniformly without replacement from {0..N_L-1}, so exactly gamma blocks are active;
    paper (sampling="bernoulli", Algorithm 1):  ell in S_i  iff  U_ell <= p = gamma / N_L,
        U_ell ~ U(0, 1) independently, so gamma blocks are active in expectation.

Parameters outside the block list (embeddings, final norm, LM head) are never touched: they keep
the requires_grad they had (in full-parameter training, trainable at every step: p_E = p_H = 1).
The draw of period i depends on (seed, i) only, so a resumed run samples the same blocks.

What LISA trains is what was trainable in the blocks when it was bound to the model:
  - on a plain model (full-parameter training, the paper's setting) it samples whole blocks;
  - on a model with injected adapters (what `lorakit train --lisa-layers G` does) the base is
    frozen, so it samples the adapters' parameters grouped by decoder block, and the embeddings
    and head stay frozen (the adapter file does not hold them).

Optimizer state (the memory saving): a block leaving the active set gets requires_grad=False, its
gradients are dropped (grad = None, so AdamW neither updates nor decays it: it is bitwise frozen)
and its entries in the optimizer's state are deleted; a block re-entering starts from fresh
moments (Adam step 1 on its first update), as in LMFlow's `LISATrainer`, which rebuilds the
optimizer at every switch. So the state holds the always-on parameters plus the active blocks
only. Deviation from `LISATrainer`: a block drawn in two consecutive periods keeps its moments
(it was never frozen); the rebuild resets them. `keep_stale_state=True` gives the behaviour of
LMFlow's plain callback instead (states of frozen blocks kept and reused; memory grows to the
full-training state). The learning-rate schedule is global (never restarted per period).

The optimizer must hold every parameter LISA may activate (build it before the first step, over
all trainable parameters, as `transformers.Trainer` does); LISA never adds parameters to it.

Plain loop:

    lisa = LISA(model, active_layers=2, interval=20, seed=0)
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    for step in range(T):                   # step = optimizer steps already taken
        lisa.begin_step(step, optimizer)    # before this step's forward passes
        ...forward / backward / optimizer.step() / optimizer.zero_grad()...
    lisa.restore()                          # every parameter LISA manages trainable again

With transformers.Trainer: `Trainer(..., callbacks=[LISA(model, 2, 20)])` (the switch happens at
`on_step_begin`; the optimizer comes in the callback kwargs). Under DDP, frozen blocks leave the
graph: use `ddp_find_unused_parameters=True`, as LMFlow does.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from lorakit.core.errors import ConfigError

logger = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "bernoulli")


def lisa_draw(n_layers: int, active_layers: int, period: int, seed: int = 0, sampling: str = "uniform") -> tuple[int, ...]:
    """The sorted block indices active in `period` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, period])
    if sampling == "uniform":
        chosen = rng.choice(n_layers, size=active_layers, replace=False)
    elif sampling == "bernoulli":
        chosen = np.flatnonzero(rng.random(n_layers) <= active_layers / n_layers)
    else:
        raise ConfigError(f"sampling={sampling!r} is invalid: use one of {SAMPLINGS}")
    return tuple(sorted(int(i) for i in chosen))


def find_blocks(model: nn.Module, layers: str | nn.ModuleList | None = None) -> nn.ModuleList:
    """The model's list of decoder blocks: `layers` itself, the submodule it names, or (None) the
    longest ModuleList whose entries all have one class (model.layers, transformer.h, ...)."""
    if isinstance(layers, nn.ModuleList):
        return layers
    if isinstance(layers, str):
        try:
            found = model.get_submodule(layers)
        except AttributeError:
            found = None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise ConfigError(f"layers={layers!r} does not name a ModuleList of the model; "
                              f"its ModuleLists: {_module_lists(model) or 'none'}")
        return found
    if layers is not None:
        raise ConfigError(f"layers={layers!r} is invalid: pass a ModuleList, its dotted name, or None to find it")
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1]
    if not candidates:
        raise ConfigError("the model has no list of identical blocks to sample from; "
                          "pass layers='dotted.name' of its decoder layers")
    longest = max(len(module) for _, module in candidates)
    best = [(name, module) for name, module in candidates if len(module) == longest]
    if len(best) > 1:
        raise ConfigError(f"several block lists fit: {[name for name, _ in best]}; pass layers= one of them")
    return best[0][1]


def _module_lists(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class LISA(TrainerCallback):
    """Keeps `active_layers` (gamma) sampled blocks trainable, re-drawn every `interval` (K) steps.

    model: the model, or None to bind at `on_train_begin` (Trainer passes it).
    active_layers: gamma, blocks active per period (LMFlow default 2); in "bernoulli" mode the
        expected number, p = gamma / N_L.
    interval: K, optimizer steps per period (LMFlow default 20).
    layers: the block list (a ModuleList or its dotted name); None finds it (`find_blocks`).
    seed: the draws' seed; period i's draw depends on (seed, i) only.
    sampling: "uniform" (default; exactly gamma distinct blocks, the official code) or "bernoulli"
        (the paper's Algorithm 1; a period may hold 0 or more than gamma blocks).
    keep_stale_state: keep the optimizer state of frozen blocks (LMFlow's callback; memory grows).
    """

    def __init__(self, model: nn.Module | None = None, active_layers: int = 2, interval: int = 20, *,
                 layers: str | nn.ModuleList | None = None, seed: int = 0, sampling: str = "uniform",
                 keep_stale_state: bool = False):
        for name, value in (("active_layers", active_layers), ("interval", interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} is invalid: it must be a positive integer")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling={sampling!r} is invalid: use one of {SAMPLINGS}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} is invalid: it must be a non-negative integer")
        self.active_layers = active_layers
        self.interval = interval
        self.layers = layers
        self.seed = seed
        self.sampling = sampling
        self.keep_stale_state = keep_stale_state
        self.blocks: nn.ModuleList | None = None
        self.block_params: list[list[nn.Parameter]] = []  # per block, the parameters LISA switches
        self.active: tuple[int, ...] = ()
        self.period: int | None = None
        self._checked_optimizer = None
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Find the blocks and record, per block, its trainable parameters: the ones LISA switches."""
        blocks = find_blocks(model, self.layers)
        n = len(blocks)
        if self.sampling == "uniform" and self.active_layers > n:
            raise ConfigError(f"active_layers={self.active_layers} is more than the model's {n} blocks; use 1..{n}")
        self.block_params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
        if not any(self.block_params):
            raise ConfigError("no parameter of the model's blocks is trainable, so LISA has nothing to sample; "
                              "unfreeze the model (full training) or inject an adapter first")
        self.blocks = blocks
        self.active, self.period, self._checked_optimizer = (), None, None

    def draw(self, period: int) -> tuple[int, ...]:
        return lisa_draw(len(self.block_params), self.active_layers, period, self.seed, self.sampling)

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Make the blocks of the period holding optimizer step `step` (0-based: steps already taken)
        the trainable ones; call before that step's forward passes. True when the set was switched.
        Works for a resumed run: the first call draws the period's blocks whatever `step` is."""
        if self.blocks is None:
            raise ConfigError("LISA is not bound to a model: pass the model to LISA(...) or call bind(model)")
        period = step // self.interval
        if period == self.period:
            return False
        self.activate(self.draw(period), optimizer)
        self.period = period
        logger.info("LISA period %d (steps %d..%d): training blocks %s", period, period * self.interval,
                    (period + 1) * self.interval - 1, list(self.active))
        return True

    @torch.no_grad()
    def activate(self, indices, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make exactly the blocks `indices` trainable; frozen ones lose their gradient and optimizer state."""
        optimizer = _unwrap(optimizer)
        if optimizer is not None and optimizer is not self._checked_optimizer:
            self._check_optimizer(optimizer)
        chosen = set(int(i) for i in indices)
        for index, params in enumerate(self.block_params):
            on = index in chosen
            for p in params:
                if on == p.requires_grad:
                    continue  # stays active (keeps its moments) or stays frozen
                if not self.keep_stale_state and optimizer is not None:
                    optimizer.state.pop(p, None)  # leaving: free its moments; entering: start fresh
                p.requires_grad_(on)
                p.grad = None
        self.active = tuple(sorted(chosen))

    def restore(self) -> None:
        """Every parameter LISA manages trainable again (the model as it was bound)."""
        for params in self.block_params:
            for p in params:
                p.requires_grad_(True)
        self.active, self.period = tuple(range(len(self.block_params))), None

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = sum(id(p) not in held for params in self.block_params for p in params)
        if missing:
            raise ConfigError(f"the optimizer does not hold {missing} block parameter(s) LISA may activate; "
                              "build it over all trainable parameters before the first LISA step (LISA never "
                              "adds parameters to an optimizer)")
        self._checked_optimizer = optimizer

    # transformers.TrainerCallback hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.blocks is None:
            self.bind(model)
        self.period = None  # the first step draws its period's blocks (also when resuming)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.begin_step(state.global_step, optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


__all__ = ["LISA", "find_blocks", "lisa_draw"]
