"""LoRA-GGPO / LoRA-MGPO: AdamW whose gradients are taken at a guided perturbation of the frozen weights.

Chang, Guo, Chang, Wu, arXiv 2502.14538 (v1 "LoRA-GGPO: Gradient-Guided Perturbation Optimization";
v2/v3 "LoRA-MGPO: Momentum-Guided Perturbation Optimization", Findings of EMNLP 2025). Official
code: llm172/LoRA-MGPO (`lora_mgpo/trainer.py`, which holds the MGPO algorithm only). One forward and
one backward per step, unlike SAM's two.

variant="mgpo" (default; the official code). For every LoRA pair (A: r x n, B: m x r, dW = s B A):

    v    = s (M_B A + B M_A)                        M_A, M_B: AdamW's first moments (exp_avg) of A, B
    kappa = min(1 / (gbar + 1e-12), max_scale)      (1 before the first gradient, or normalize=False)
    eps  = -rho * kappa * v / (||v||_F + 1e-12)     no perturbation while a moment is missing (the
                                                    first step), ||v|| <= 1e-12 or v is not finite
    forward at W + eps, gradients for A and B there
    gbar <- n on first use, else beta gbar + (1 - beta) n,  n = ||s (g_B A + B g_A)||_F,
    then the AdamW step with betas = (mu, beta2).

The sign is the official code's: eps points along -momentum (a look-ahead), not along +gradient as
in SAM. A factor that does not train (LoRA-FA's A) has zero momentum and gradient here; the
official code skips such a layer instead.

variant="ggpo_v1_experimental" (UNVERIFIED: the v1 paper's method section and code were not
readable; this is kohya-ss/sd-scripts' reading, networks/lora_flux.py). Per output row i
(norm_dim="rows"; "cols" is the same over input columns, divided by sqrt(n)):

    c_i = sqrt(w0^2 + ||(s B A)_i,:||^2)     w0: mean row norm of W0 from <= 1000 rows, once
    g_i = ||s (B g_A + g_B A)_i,:||          from the gradients the last `step()` applied
    eps_ij ~ N(0, sigma_i^2),  sigma_i = (v1_sigma c_i + v1_beta g_i^2) / sqrt(m),  resampled on
    every training forward (global RNG); no noise before the first step.

When the weights are perturbed. W itself is never written: the perturbation is the functional form
the spec prefers, a forward hook on each targeted base layer that returns W x + b + eps x. It is
active exactly when (1) the optimizer is attached (from construction until `detach()`), (2) the
base layer is in training mode (`model.train()`), (3) the layer runs the adapter (active, not
merged, not disabled) and (4) not inside `with optimizer.unperturbed():`. eps is computed at the
first such forward after anything it depends on changed (a `step()`, an EMA update,
`load_state_dict`) and reused until then, so gradient-checkpointing recomputations see the same eps
(MGPO). Nothing saved ever holds eps: adapter tensors are never perturbed and the base weight is
bitwise unchanged, so `save_adapter`, checkpoints and `model.eval()` evaluation are clean.

Plain loop:

    optimizer = GGPO(model, lr=1e-4)          # attaches the hooks
    for batch in batches:
        model.train()
        model(**batch).loss.backward()        # forward at W + eps; the EMA updates after backward
        optimizer.step()                      # AdamW step; the next forward uses the next eps
        optimizer.zero_grad()
    model.eval()                              # evaluation is unperturbed
    optimizer.detach()                        # before training the model with anything else

transformers.Trainer: pass `optimizers=(GGPO(model, ...), None)`; `lorakit train --optimizer ggpo`
does it. Trainer evaluates in eval mode and saves adapter tensors, both unperturbed; no callback
is needed.

The EMA is updated by hooks that fire when a backward has accumulated the gradients of both
factors, reading their cumulative `.grad` before clipping: with gradient accumulation it advances
once per micro-batch and eps is recomputed per micro-batch, as in the official trainer. Under DDP
the norm is taken from the local gradient. Hyperparameters default to the official "nlu" profile
(rho = 0.05, mu = beta = 0.9); "nlg" is rho = 0.01, mu = beta = 0.8.

Adapters: pairs come from `Adapter.factors()` (LoRA and its variants), with s = the adapter's
`scaling` attribute (1 when it has none). Trainable parameters of adapters without factors (VeRA,
Bone, ...) are optimised by plain AdamW with no perturbation; a model with no factor pairs at all
is an error. With DoRA the perturbation enters the base output (the magnitude normalisation still
uses W).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import require_choice, require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers
from lorakit.core.layer import AdaptedLinear
from lorakit.optim import register_optimizer, trainable

GGPO_VARIANTS = ("mgpo", "ggpo_v1_experimental")
NORM_DIMS = ("rows", "cols")
W0_SAMPLE_ROWS = 1000


@dataclass
class GGPOOptions:
    """Options of `GGPO` (`lorakit train --optimizer ggpo --optimizer-options '{...}'`).

    rho: perturbation radius (>= 0; 0 = plain AdamW); official "nlu" 0.05, "nlg" 0.01.
    mu: AdamW's beta1, the momentum the direction is built from, in [0, 1); "nlu" 0.9, "nlg" 0.8.
    beta: EMA factor of the per-layer gradient norm, in [0, 1); "nlu" 0.9, "nlg" 0.8.
    beta2, eps: AdamW's beta2 and eps (torch / Trainer defaults).
    normalize: scale eps by 1 / EMA gradient norm (kappa); off = kappa 1.
    max_scale: upper clamp of kappa (official 10).
    perturbation_eps: the 1e-12 of the norms above.
    variant: "mgpo" (official code) or "ggpo_v1_experimental" (unverified v1 reading).
    v1_sigma, v1_beta, norm_dim: the v1 variant's sigma (0.03), beta (0.01) and row/column statistics.
    adapter_name: perturb only this adapter's layers (default: every adapter with factors).
    """

    rho: float = 0.05
    mu: float = 0.9
    beta: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    normalize: bool = True
    max_scale: float = 10.0
    perturbation_eps: float = 1e-12
    variant: str = "mgpo"
    v1_sigma: float = 0.03
    v1_beta: float = 0.01
    norm_dim: str = "rows"
    adapter_name: str | None = None

    def validate(self) -> None:
        for name in ("rho", "v1_sigma", "v1_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name}={value!r} is invalid: it must be a number >= 0")
        for name in ("mu", "beta", "beta2"):
            require_in_range(name, getattr(self, name), 0.0, 1.0)
        require_positive("eps", self.eps)
        require_positive("max_scale", self.max_scale)
        require_positive("perturbation_eps", self.perturbation_eps)
        require_choice("variant", self.variant, GGPO_VARIANTS)
        require_choice("norm_dim", self.norm_dim, NORM_DIMS)


@dataclass
class _Pair:
    """One (A, B) factor pair and the layer whose base output it perturbs."""

    path: str
    layer: AdaptedLinear
    adapter_name: str
    A: nn.Parameter
    B: nn.Parameter
    scaling: float

    def running(self) -> bool:
        layer = self.layer
        return not layer.adapters_disabled and self.adapter_name in layer.active and self.adapter_name not in layer.merged

    def weight_space(self, dB: torch.Tensor | None, dA: torch.Tensor | None) -> torch.Tensor:
        """s (dB A + B dA) in fp32; a None term (a factor that does not train) counts as zero."""
        total = torch.zeros(self.B.shape[0], self.A.shape[1], device=self.A.device, dtype=torch.float32)
        if dB is not None:
            total += dB.float() @ self.A.detach().float()
        if dA is not None:
            total += self.B.detach().float() @ dA.float()
        return self.scaling * total


class GGPO(torch.optim.AdamW):
    """AdamW(betas=(mu, beta2)) over `model`'s trainable parameters whose training forwards run at
    guided perturbations of the frozen weights of every LoRA layer (see the module docstring)."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, *, weight_decay: float = 0.0, **options):
        self.options = GGPOOptions(**options)
        self.options.validate()
        o = self.options
        super().__init__(trainable(model), lr=lr, betas=(o.mu, o.beta2), eps=o.eps, weight_decay=weight_decay)
        self.pairs = self._find_pairs(model, o.adapter_name)
        self.grad_norm_ema: list[torch.Tensor | None] = [None] * len(self.pairs)  # MGPO's gbar per pair
        self.grad_row_norms: list[torch.Tensor | None] = [None] * len(self.pairs)  # v1's g_i per pair
        self.w0_norm: list[torch.Tensor | None] = [None] * len(self.pairs)  # v1's w0 per pair
        if o.variant == "ggpo_v1_experimental":
            self.w0_norm = [self._mean_base_norm(pair) for pair in self.pairs]
        self._epsilon: dict[int, torch.Tensor | None] = {}  # pair index -> cached eps (MGPO)
        self._grads_seen: list[set[int]] = [set() for _ in self.pairs]
        self._enabled = True
        self._handles: list = []
        self.attach()

    # --- discovery ---------------------------------------------------------------------------
    @staticmethod
    def _find_pairs(model: nn.Module, adapter_name: str | None) -> list[_Pair]:
        pairs = []
        for path, layer in adapted_layers(model):
            for name, adapter in layer.adapters.items():
                if adapter_name is not None and name != adapter_name:
                    continue
                for A, B in adapter.factors():
                    if A.requires_grad or B.requires_grad:
                        pairs.append(_Pair(f"{path}[{name}]", layer, name, A, B, float(getattr(adapter, "scaling", 1.0))))
        if not pairs:
            which = "adapter" if adapter_name is None else f"adapter named {adapter_name!r}"
            raise ConfigError(
                f"GGPO found no trainable (A, B) factor pairs in any {which}: it perturbs LoRA-style "
                "layers (Adapter.factors()); inject a LoRA adapter (lorakit.LoraConfig) or use --optimizer adamw"
            )
        return pairs

    @torch.no_grad()
    def _mean_base_norm(self, pair: _Pair) -> torch.Tensor:
        """v1's w0: the mean norm of <= 1000 rows (or columns) of W0, drawn with a fixed seed so the
        global RNG is untouched (all of them, i.e. exact, when there are fewer)."""
        weight = pair.layer.weight_out_in()
        if self.options.norm_dim == "cols":
            weight = weight.T
        count = weight.shape[0]
        rows = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:W0_SAMPLE_ROWS].to(weight.device)
        return torch.linalg.vector_norm(weight[rows].float(), dim=1).mean().to(pair.A.device)

    # --- hooks -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the perturbation (forward) and EMA (gradient) hooks; done by the constructor."""
        if self._handles:
            return
        ref = weakref.ref(self)
        by_layer: dict[int, list[int]] = {}
        for index, pair in enumerate(self.pairs):
            by_layer.setdefault(id(pair.layer), []).append(index)
        for indices in by_layer.values():
            base = self.pairs[indices[0]].layer.base
            self._handles.append(base.register_forward_hook(_perturb_hook(ref, indices)))
        for index, pair in enumerate(self.pairs):
            for param in (pair.A, pair.B):
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(_grad_hook(ref, index)))

    def detach(self) -> None:
        """Remove every hook: forwards are plain from now on. `attach()` undoes it."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Training-mode forwards inside the block run at the unperturbed weights."""
        enabled, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = enabled

    def _perturbed_output(self, indices: list[int], x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        for index in indices:
            if not self.pairs[index].running():
                continue
            eps = self.perturbation(index)
            if eps is not None:
                output = output + F.linear(x, eps.to(device=x.device, dtype=x.dtype))
        return output

    # --- the perturbation --------------------------------------------------------------------
    @torch.no_grad()
    def perturbation(self, index: int) -> torch.Tensor | None:
        """eps (out, in; fp32) that the next training forward adds to pair `index`'s base weight,
        None for no perturbation. MGPO: cached until the state changes; v1: a fresh draw per call."""
        if self.options.variant == "ggpo_v1_experimental":
            return self._v1_noise(index)
        if index not in self._epsilon:
            self._epsilon[index] = self._mgpo_epsilon(index)
        return self._epsilon[index]

    def _momentum(self, param: nn.Parameter) -> torch.Tensor | None:
        return self.state[param].get("exp_avg") if param in self.state else None

    def _mgpo_epsilon(self, index: int) -> torch.Tensor | None:
        o, pair = self.options, self.pairs[index]
        moments = {}
        for key, param in (("A", pair.A), ("B", pair.B)):
            if param.requires_grad:
                moments[key] = self._momentum(param)
                if moments[key] is None:  # no step taken yet
                    return None
        v = pair.weight_space(moments.get("B"), moments.get("A"))
        if not torch.isfinite(v).all():
            return None
        norm = torch.linalg.vector_norm(v)
        if norm <= o.perturbation_eps:
            return None
        gbar = self.grad_norm_ema[index]
        kappa = v.new_tensor(1.0) if gbar is None or not o.normalize else torch.reciprocal(gbar + o.perturbation_eps)
        kappa = kappa.clamp(max=o.max_scale)
        return -o.rho * kappa * v / (norm + o.perturbation_eps)

    def _v1_noise(self, index: int) -> torch.Tensor | None:
        o, pair = self.options, self.pairs[index]
        g = self.grad_row_norms[index]
        if g is None:  # no gradient statistics before the first step
            return None
        dim = 1 if o.norm_dim == "rows" else 0
        delta = pair.weight_space(pair.B.detach(), None)  # s B A
        c = torch.sqrt(self.w0_norm[index] ** 2 + (delta**2).sum(dim=dim))
        count = delta.shape[0] if o.norm_dim == "rows" else delta.shape[1]
        std = (o.v1_sigma * c + o.v1_beta * g**2) / math.sqrt(count)
        noise = torch.randn(delta.shape, device=delta.device, dtype=torch.float32)
        return noise * (std[:, None] if o.norm_dim == "rows" else std[None, :])

    # --- statistics from gradients -----------------------------------------------------------
    def _grad_term(self, index: int) -> torch.Tensor:
        pair = self.pairs[index]
        return pair.weight_space(pair.B.grad if pair.B.requires_grad else None,
                                 pair.A.grad if pair.A.requires_grad else None)

    @torch.no_grad()
    def _gradient_accumulated(self, index: int, param: nn.Parameter) -> None:
        """MGPO's EMA, once a backward has accumulated the gradients of every trainable factor."""
        pair, seen = self.pairs[index], self._grads_seen[index]
        seen.add(id(param))
        if self.options.variant != "mgpo" or not all(id(p) in seen for p in (pair.A, pair.B) if p.requires_grad):
            return
        seen.clear()
        if any(p.grad is None for p in (pair.A, pair.B) if p.requires_grad):
            return
        norm = torch.linalg.vector_norm(self._grad_term(index))
        previous = self.grad_norm_ema[index]
        beta = self.options.beta
        self.grad_norm_ema[index] = norm if previous is None else beta * previous + (1.0 - beta) * norm
        self._epsilon.pop(index, None)

    @torch.no_grad()
    def step(self, closure=None):
        """The AdamW step (after v1's gradient statistics); the next training forward uses a new eps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.options.variant == "ggpo_v1_experimental":
            dim = 1 if self.options.norm_dim == "rows" else 0
            for index, pair in enumerate(self.pairs):
                if all(p.grad is not None for p in (pair.A, pair.B) if p.requires_grad):
                    self.grad_row_norms[index] = torch.linalg.vector_norm(self._grad_term(index), dim=dim)
        super().step()
        self._epsilon.clear()
        return loss

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["ggpo"] = {"grad_norm_ema": list(self.grad_norm_ema), "grad_row_norms": list(self.grad_row_norms)}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("ggpo", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            if len(extra["grad_norm_ema"]) != len(self.pairs):
                raise ConfigError(
                    f"this GGPO state holds {len(extra['grad_norm_ema'])} factor pairs but the model has "
                    f"{len(self.pairs)}; load it into an optimizer built on the same adapters"
                )
            device = self.pairs[0].A.device
            move = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
            self.grad_norm_ema = [move(t) for t in extra["grad_norm_ema"]]
            self.grad_row_norms = [move(t) for t in extra["grad_row_norms"]]
        self._epsilon.clear()


def _perturb_hook(ref: weakref.ref, indices: list[int]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        optimizer = ref()
        if optimizer is None or not module.training or not optimizer._enabled:
            return None
        return optimizer._perturbed_output(indices, args[0], output)

    return hook


def _grad_hook(ref: weakref.ref, index: int):
    def hook(param: torch.Tensor) -> None:
        optimizer = ref()
        if optimizer is not None:
            optimizer._gradient_accumulated(index, param)

    return hook


@register_optimizer("ggpo", GGPOOptions)
def ggpo(model: nn.Module, lr: float, weight_decay: float, options: GGPOOptions) -> torch.optim.Optimizer:
    """LoRA-GGPO/MGPO (`GGPO`) over the model's trainable parameters."""
    return GGPO(model, lr=lr, weight_decay=weight_decay, **asdict(options))


__all__ = ["GGPO", "GGPOOptions"]
