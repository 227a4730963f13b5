"""ALLoRA: adaptive learning rate for LoRA, dropout-free and scaling-free.

Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692
(Sec. 4.2, App. C, App. F Listing 1). Registered as `lorakit train --optimizer allora`.

The paper's adapter is plain LoRA without dropout and without the alpha/r factor, W_eff = W + B A
(in lorakit: `LoraConfig(alpha=r, dropout=0)`; this optimiser does not change the adapter's
config). Its rule acts on gradients: with g = dL/d(BA) (n1 x n2) and g_i its i-th row,

    g̃_i = c_i g_i,    c_i = 1 / sqrt(||(B A)_i||_2 + 1/η²)    (the norm is not squared),

so c_i = η for a zero row (all rows at B = 0) and c_i ~ ||(B A)_i||^(-1/2) for large rows. In
terms of the factors, with δ = dL/d(LoRA branch output) (..., n1), δ̃ = δ ⊙ c and the branch
input x:

    grad_B = δ̃ᵀ (x Aᵀ) = diag(c) · (plain grad_B)
    grad_A = Bᵀ δ̃ᵀ x                  (not a rescale of plain grad_A)
    grad_x = δ B A                    (unchanged: the input gradient uses the unscaled δ)

summed over batch and token axes. c comes from the weights of the forward pass (no gradient
flows through it); ||(B A)_i||² = b_i (A Aᵀ) b_iᵀ through the r x r Gram matrix, so B A is never
formed. The update itself is AdamW's on g̃ (the paper feeds g̃ to the usual optimiser; its
commonsense runs use DoRA's AdamW recipe).

How: building `ALLoRA(model, lr=...)` installs forward hooks on the modules that apply A and B
in every adapter exposing `Adapter.factors()` (they must be bias-free `nn.Linear`s holding the
factor as `weight`, as LoRA's `lora_A` / `lora_B`; otherwise ConfigError). The hooks route the
branch through two autograd Functions that reuse the module's output and change only the
backward, so `loss.backward()` already leaves g̃ in `.grad` (gradient clipping sees it) and
`step()` is `torch.optim.AdamW.step`. The hooks stay (even if the optimiser is dropped) until
`remove_hooks()`, which restores plain LoRA gradients. No-grad
forwards (evaluation, generation) are untouched. c uses the factor product B A, which is the
whole update only at the paper's scaling s = 1; with another s the gradients carry s as
autograd computes them and c is still taken from B A.

Other parameters: trainable parameters of adapters without factors (VeRA, Bone, ...) or outside
adapters get plain AdamW with the same settings; a model with no trainable factor pair is an
error. Default η = 2 (the paper's Listing 1 hard-codes 1/η² = 1/4; Table 1 uses η = 1; the
paper searches η² in {1, 2, 4}).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.adapter import Adapter
from lorakit.core.config import require_positive
from lorakit.core.errors import ConfigError
from lorakit.optim import register_optimizer, trainable

DEFAULT_ETA = 2.0  # Listing 1: 1/η² = 1/4


def allora_coefficients(A: torch.Tensor, B: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i = 1 / sqrt(||(B A)_i|| + 1/η²) for every output row i, without forming B A."""
    with torch.no_grad():
        row_norm_sq = ((B @ (A @ A.T)) * B).sum(dim=1).clamp_min(0)  # b_i (A Aᵀ) b_iᵀ
        return (row_norm_sq.sqrt() + 1.0 / eta**2).rsqrt()


class _Link:
    """Carries δ̃ B from B's backward to A's backward within one forward call."""

    __slots__ = ("scaled_grad_h",)

    def __init__(self) -> None:
        self.scaled_grad_h: torch.Tensor | None = None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _ApplyB(torch.autograd.Function):
    """u = h Bᵀ (the value the module computed); grad_h = δ B, grad_B = (δ ⊙ c)ᵀ h."""

    @staticmethod
    def forward(ctx, h, B, value, c, link):
        ctx.save_for_backward(h, B, c)
        ctx.link = link
        return value

    @staticmethod
    def backward(ctx, grad_u):
        h, B, c = ctx.saved_tensors
        grad_u = grad_u.to(B.dtype)
        scaled = grad_u * c  # δ̃, c broadcast over the output axis
        ctx.link.scaled_grad_h = scaled @ B
        grad_h = (grad_u @ B).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_B = _flat(scaled).T @ _flat(h).to(B.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_B, None, None, None


class _ApplyA(torch.autograd.Function):
    """h = x Aᵀ (the value the module computed); grad_x = grad_h A, grad_A = (δ̃ B)ᵀ x."""

    @staticmethod
    def forward(ctx, x, A, value, link):
        ctx.save_for_backward(x, A)
        ctx.link = link
        return value

    @staticmethod
    def backward(ctx, grad_h):
        x, A = ctx.saved_tensors
        grad_x = (grad_h.to(A.dtype) @ A).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_A = None
        if ctx.needs_input_grad[1]:
            # Without B's Function in the graph (a bare call of A's module) the plain gradient.
            source = ctx.link.scaled_grad_h if ctx.link.scaled_grad_h is not None else grad_h
            grad_A = _flat(source.to(A.dtype)).T @ _flat(x).to(A.dtype)
        ctx.link.scaled_grad_h = None
        return grad_x, grad_A, None, None


def _linear_holding(adapter: nn.Module, weight: nn.Parameter) -> nn.Linear:
    for module in adapter.modules():
        if isinstance(module, nn.Linear) and module.weight is weight and module.bias is None:
            return module
    raise ConfigError(
        f"ALLoRA changes the backward of the modules that apply the factors, but {type(adapter).__name__} "
        "holds a factor outside a bias-free nn.Linear; use --optimizer adamw (or loraplus) for this method"
    )


class _FactorPair:
    """The hooks on one (A, B) pair: A's module, then B's module, in every grad-enabled forward."""

    def __init__(self, A: nn.Parameter, B: nn.Parameter, module_a: nn.Linear, module_b: nn.Linear, eta: float):
        self.A, self.B, self.eta = A, B, eta
        self.pending: _Link | None = None
        self.coefficients: torch.Tensor | None = None  # c of the latest grad-enabled forward
        self.handles = [module_a.register_forward_hook(self.after_a), module_b.register_forward_hook(self.after_b)]

    def after_a(self, module, inputs, output):
        if not torch.is_grad_enabled():
            return None
        self.pending = _Link()
        return _ApplyA.apply(inputs[0], self.A, output.detach(), self.pending)

    def after_b(self, module, inputs, output):
        link, self.pending = self.pending, None
        if not torch.is_grad_enabled() or link is None:
            return None
        self.coefficients = allora_coefficients(self.A.detach(), self.B.detach(), self.eta)
        return _ApplyB.apply(inputs[0], self.B, output.detach(), self.coefficients, link)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class ALLoRA(torch.optim.AdamW):
    """AdamW on ALLoRA's row-rescaled LoRA gradients (arXiv 2410.09692); see the module docstring.

    `ALLoRA(model, lr=1e-4, eta=2.0)` covers all of `model`'s trainable parameters and installs
    the gradient rule on every trainable factor pair of its adapters, so build it before the
    training forward passes. `weight_decay` defaults to 0; other keyword arguments go to AdamW.
    """

    def __init__(self, model: nn.Module, lr: float, eta: float = DEFAULT_ETA, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **adamw_kwargs):
        if not isinstance(model, nn.Module):
            raise ConfigError("ALLoRA takes the model (it hooks the adapters' factors), not a parameter list")
        require_positive("eta", eta)
        self.eta = eta
        self._pairs: dict[str, _FactorPair] = {}
        pairs = []
        for path, adapter in model.named_modules():
            if isinstance(adapter, Adapter):
                for index, (A, B) in enumerate(adapter.factors()):
                    if A.requires_grad or B.requires_grad:
                        key = path if index == 0 else f"{path}#{index}"
                        pairs.append((key, A, B, _linear_holding(adapter, A), _linear_holding(adapter, B)))
        if not pairs:
            raise ConfigError(
                "ALLoRA needs trainable (A, B) factors (Adapter.factors(), e.g. method 'lora'); the model's "
                "adapters expose none; use the plain optimizer (--optimizer adamw) for this method"
            )
        super().__init__(trainable(model), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **adamw_kwargs)
        for key, A, B, module_a, module_b in pairs:
            self._pairs[key] = _FactorPair(A, B, module_a, module_b, eta)

    def coefficients(self) -> dict[str, torch.Tensor]:
        """c (one value per output row) of each factor pair's latest grad-enabled forward, keyed
        by the adapter's module path (for logging: c = η means the row of B A is still zero)."""
        return {key: pair.coefficients for key, pair in self._pairs.items() if pair.coefficients is not None}

    def remove_hooks(self) -> None:
        """Give the adapters back their plain LoRA gradients (the optimiser then is plain AdamW)."""
        for pair in self._pairs.values():
            pair.remove()


@dataclass
class ALLoRAOptions:
    """eta: η (> 0), c = η for a zero row of B A (default 2, the paper's Listing 1). betas, eps: AdamW's."""

    eta: float = DEFAULT_ETA
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        require_positive("eta", self.eta)
        require_positive("eps", self.eps)


@register_optimizer("allora", ALLoRAOptions)
def allora(model: nn.Module, lr: float, weight_decay: float, options: ALLoRAOptions) -> ALLoRA:
    return ALLoRA(model, lr=lr, eta=options.eta, weight_decay=weight_decay, betas=options.betas, eps=options.eps)
