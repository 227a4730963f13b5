"""LoRA-Pro: LoRA gradients adjusted to approximate full fine-tuning.

Wang, Liang, He, Wang, Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", arXiv 2407.18242
(ICLR 2025). Registered as `lorakit train --optimizer lora-pro`.

A LoRA layer has W_eff = W + s B A (W: m x n, A: r x n, B: m x r, s the adapter's scaling).
Autograd gives g_A^lora = s Bᵀ g and g_B^lora = s g Aᵀ with g = dL/dW_eff (g itself is never
formed). A step with gradients (g_A, g_B) moves W_eff by -η g̃ to first order, with the
*equivalent gradient* g̃ = s (B g_A + g_B A). LoRA-Pro uses the pair whose g̃ is the
least-squares closest to g (Theorem 2.1, A full row rank, B full column rank):

    g_A = (1/s²) (BᵀB)⁻¹ g_A^lora + X A
    g_B = (1/s²) [I - B (BᵀB)⁻¹ Bᵀ] g_B^lora (AAᵀ)⁻¹ - B X

so that g̃ = P_B g + (I - P_B) g P_A, P_B = B (BᵀB)⁻¹ Bᵀ, P_A = Aᵀ (AAᵀ)⁻¹ A: the orthogonal
projection of g onto the tangent space {B Y + Z A}, whatever the r x r matrix X. X is the one
that keeps (g_A, g_B) closest to the LoRA gradients (Theorem 2.2), the solution of

    (BᵀB) X + X (AAᵀ) = -(1/s²) (BᵀB)⁻¹ g_A^lora Aᵀ.

AdamW form (the default; the official "lora-pro-full"), per layer at optimizer step t = 1, 2, ...:
  1. the adjusted gradients with X = 0 and their g̃ (m x n);
  2. M <- β1 M + (1 - β1) g̃,  V <- β2 V + (1 - β2) g̃²  (full-size moments, fp32 or wider);
     G = M̂ / (√V̂ + ε),  M̂ = M / (1 - β1^t),  V̂ = V / (1 - β2^t);
  3. G is taken as the full gradient: g_A^lora = s Bᵀ G, g_B^lora = s G Aᵀ;
  4. the closed form again, with the Sylvester X;
  5. A <- A - η (g_A + λ A),  B <- B - η (g_B + λ B)  (decoupled weight decay λ).
SGD form (mode="sgd"): steps 4-5 on the autograd gradients; no optimizer state.

Numerics. The inverses are pinv(M + δI) (δ = 1e-8, as the official code). They and the Sylvester
solve come from one eigendecomposition of each r x r Gram matrix, in float64:
BᵀB = U diag(λ) Uᵀ, AAᵀ = V diag(μ) Vᵀ, X = U [(Uᵀ C V) ⊘ (λ_i + μ_j)] Vᵀ (exact; the official
code's complex `eig` solve gives the same X). The m x m projector is never formed. With B = 0
(the first step from LoRA's standard init) this gives g_A = 0, X = 0 and
g_B = (1/s²) g_B^lora (AAᵀ)⁻¹, hence g̃ = g P_A and A does not move: the paper's first-step
rule, with no special case.

Differences from the official code (mrflogs/LoRA-Pro, the vendored DeepSpeed's
`runtime/zero/stage_1_and_2.py`, `lorapro_full_adjustment`), on purpose:
- scaling: it sets `scaling_factor = 16 / 8` for every layer, also in its rsLoRA runs (where
  s = 16 / √8 ≈ 5.66); here s is each adapter's own `scaling` (α/r, α/√r with rsLoRA, per-module
  rank/alpha patterns).
- bias correction: `step()` increments `global_step` before the adjustment, which then uses
  `step = global_step + 1`, so the first update is bias-corrected with t = 2 (and every update
  with t + 1); here t = 1 on the first step. (Its `global_step == 0` first-step branch never runs
  for the same reason; its general branch reaches the B = 0 result through pinv(δI).)
- also: V is accumulated in fp32 (it casts g̃ to bf16 for V's update), (A, B) pairs come from
  `Adapter.factors()` (not from parameter order), and the update is applied here (it sets the
  HF Trainer's optimizer to SGD with weight decay 0 and runs Adam inside DeepSpeed's ZeRO-2 step).

Which parameters: every trainable (A, B) pair from `Adapter.factors()` of the model's adapters,
with s = the adapter's `scaling`. Errors (ConfigError): a model with no such pair (VeRA, Bone, ...:
use another optimizer), DoRA (W_eff is no longer W + s B A), a pair with A or B frozen
(`freeze_a=True`: the tangent space is not {B Y + Z A}), an adapter with factors but no numeric
`scaling`. Fallback: any other trainable parameter (an adapter without factors next to a LoRA,
a trainable head) gets plain AdamW with the same lr, betas, eps and weight decay.

Cost: per layer and step O(m n r) extra matmuls plus r x r eigendecompositions; the AdamW form
keeps two m x n moment buffers per layer (the size of full fine-tuning's Adam state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers
from lorakit.optim import register_optimizer

DELTA = 1e-8  # ridge of the pinv(M + δI) inverses (official value)
MODES = ("adamw", "sgd")


# --- the closed form -----------------------------------------------------------------------------
def _eigh_psd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.clamp(min=0), vectors  # a Gram matrix is PSD; rounding can dip below 0


def _cut(values: torch.Tensor) -> torch.Tensor:
    """True where `values` exceed torch.linalg.pinv's default cut-off (n·eps·max)."""
    return values > values.max() * values.numel() * torch.finfo(values.dtype).eps


def _ridge_pinv(values: torch.Tensor, vectors: torch.Tensor, delta: float) -> torch.Tensor:
    """pinv(M + δI) from M's eigendecomposition."""
    shifted = values + delta
    keep = _cut(shifted)
    inverse = torch.where(keep, 1.0 / shifted.where(keep, torch.ones_like(shifted)), torch.zeros_like(shifted))
    return (vectors * inverse) @ vectors.T


class _Grams:
    """Eigendecompositions of BᵀB and AAᵀ in float64, shared by the inverses and the Sylvester solve."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, delta: float):
        self.A, self.B = A.detach().double(), B.detach().double()
        self.lam, self.U = _eigh_psd(self.B.T @ self.B)
        self.mu, self.V = _eigh_psd(self.A @ self.A.T)
        self.inv_BtB = _ridge_pinv(self.lam, self.U, delta)
        self.inv_AAt = _ridge_pinv(self.mu, self.V, delta)

    def sylvester(self, C: torch.Tensor) -> torch.Tensor:
        """X with (BᵀB) X + X (AAᵀ) = C."""
        return _sylvester_eig(self.lam, self.U, self.mu, self.V, C)


def _sylvester_eig(lam, U, mu, V, C):
    denominator = lam[:, None] + mu[None, :]
    keep = _cut(denominator)  # λ_i + μ_j = 0 only when both Grams are singular: minimum-norm solution
    rotated = U.T @ C @ V
    rotated = torch.where(keep, rotated / denominator.where(keep, torch.ones_like(denominator)), torch.zeros_like(rotated))
    return U @ rotated @ V.T


def solve_sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric positive semidefinite P (r x r) and Q (k x k), in float64.

    Unique when λ_i(P) + μ_j(Q) > 0 for all i, j (one of them positive definite); components with
    λ_i + μ_j = 0 are set to 0 (the minimum-norm solution)."""
    lam, U = _eigh_psd(P.double())
    mu, V = _eigh_psd(Q.double())
    return _sylvester_eig(lam, U, mu, V, C.double())


def _closed_form(grams: _Grams, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float, x):
    """Theorem 2.1 with X = 0 ("zero"), the Sylvester X ("sylvester") or a given X; float64."""
    inv_s2 = 1.0 / scaling**2
    A, B = grams.A, grams.B
    free_A = inv_s2 * (grams.inv_BtB @ grad_A)  # (1/s²) (BᵀB)⁻¹ g_A^lora
    Y = inv_s2 * (grad_B @ grams.inv_AAt)  # (1/s²) g_B^lora (AAᵀ)⁻¹
    free_B = Y - B @ (grams.inv_BtB @ (B.T @ Y))  # [I - B (BᵀB)⁻¹ Bᵀ] Y without the m x m projector
    if isinstance(x, str) and x == "zero":
        X = torch.zeros(A.shape[0], A.shape[0], dtype=A.dtype, device=A.device)
    elif isinstance(x, str) and x == "sylvester":
        X = grams.sylvester(-(free_A @ A.T))  # C = -(1/s²) (BᵀB)⁻¹ g_A^lora Aᵀ
    elif isinstance(x, torch.Tensor):
        X = x.to(A)
    else:
        raise ValueError(f"x={x!r}: expected 'sylvester', 'zero' or an r x r tensor")
    return free_A + X @ A, free_B - B @ X, X


def adjusted_gradients(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scaling: float,
                       x: str | torch.Tensor = "sylvester", delta: float = DELTA):
    """LoRA-Pro's (g_A, g_B, X) from the LoRA gradients g_A^lora = s Bᵀ g (r x n), g_B^lora = s g Aᵀ (m x r).

    x: "sylvester" (Theorem 2.2's X), "zero", or an r x r tensor. delta: ridge δ of pinv(M + δI).
    g_A, g_B come back in the dtypes of grad_A, grad_B; X in float64."""
    grams = _Grams(A, B, delta)
    new_A, new_B, X = _closed_form(grams, grad_A.double(), grad_B.double(), scaling, x)
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype), X


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """g̃ = s (B g_A + g_B A): the first-order change of W_eff per unit step along -(g_A, g_B)."""
    return scaling * (B @ grad_A + grad_B @ A)


# --- which parameters ------------------------------------------------------------------------------
def lora_pro_pairs(model: nn.Module) -> tuple[list[tuple[nn.Parameter, nn.Parameter, float]], list[nn.Parameter]]:
    """((A, B, s) for every trainable factor pair, the other trainable parameters); see the module doc."""
    pairs: list[tuple[nn.Parameter, nn.Parameter, float]] = []
    for path, layer in adapted_layers(model):
        for name, adapter in layer.adapters.items():
            factors = adapter.factors()
            if not factors or not any(p.requires_grad for A, B in factors for p in (A, B)):
                continue
            where = f"adapter {name!r} on {path}"
            if getattr(adapter, "use_dora", False):
                raise ConfigError(f"{where} uses DoRA; LoRA-Pro's closed form assumes W_eff = W + s B A, which DoRA's "
                                  "magnitude rescaling breaks. Train DoRA with --optimizer adamw, or LoRA-Pro without DoRA")
            scaling = getattr(adapter, "scaling", None)
            if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
                raise ConfigError(f"{where} ({type(adapter).__name__}) has factors() but no numeric `scaling` s "
                                  "(dW = s B A); LoRA-Pro needs s. Give the adapter a float `scaling` attribute")
            for A, B in factors:
                if not (A.requires_grad and B.requires_grad):
                    frozen = "A" if not A.requires_grad else "B"
                    raise ConfigError(f"{where} keeps {frozen} frozen (e.g. freeze_a=True); LoRA-Pro adjusts A and B "
                                      "jointly and needs both trainable. Use --optimizer adamw for LoRA-FA-style training")
                pairs.append((A, B, float(scaling)))
    if not pairs:
        raise ConfigError("LoRA-Pro needs adapters whose update is s B A with trainable A and B (Adapter.factors(), "
                          "e.g. method 'lora'); this model has none. Inject a LoRA adapter or use --optimizer adamw")
    paired = {id(p) for A, B, _ in pairs for p in (A, B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    return pairs, others


def _check(lr, betas, eps, weight_decay, delta, mode) -> None:
    if not lr >= 0:
        raise ConfigError(f"lr={lr!r} is invalid: it must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas={betas!r} is invalid: two numbers in [0, 1)")
    for label, value in (("eps", eps), ("weight_decay", weight_decay), ("delta", delta)):
        if not value >= 0:
            raise ConfigError(f"{label}={value!r} is invalid: it must be >= 0")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is invalid; allowed values: {', '.join(map(repr, MODES))}")


# --- the optimiser ---------------------------------------------------------------------------------
class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro over a model with injected LoRA adapters (see the module docstring for the equations).

    lr: η (the paper: 2e-5 on Llama-2-7B). betas, eps: Adam's, on the full-size equivalent gradient
    (official 0.9, 0.999, 1e-8). weight_decay: decoupled λ (the paper's runs: 0). delta: the
    pinv ridge δ (official 1e-8). mode: "adamw" (the paper's AdamW form) or "sgd".

    Param groups: the first holds the pairs as [A1, B1, A2, B2, ...] with their scalings under
    "scalings"; a second, "lora_pro": False, holds every other trainable parameter (plain AdamW).
    State: "step", "exp_avg", "exp_avg_sq" (m x n) under each pair's A.
    """

    def __init__(self, model: nn.Module, lr: float = 2e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = DELTA, mode: str = "adamw"):
        betas = tuple(betas)
        _check(lr, betas, eps, weight_decay, delta, mode)
        pairs, others = lora_pro_pairs(model)
        groups = [{"params": [p for A, B, _ in pairs for p in (A, B)], "scalings": [s for _, _, s in pairs],
                   "lora_pro": True}]
        if others:
            groups.append({"params": others, "lora_pro": False})
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta, mode=mode)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["lora_pro"]:
                params = group["params"]
                for A, B, scaling in zip(params[0::2], params[1::2], group["scalings"]):
                    if A.grad is not None or B.grad is not None:
                        self._step_pair(A, B, scaling, group)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw(p, group)
        return loss

    def _step_pair(self, A: nn.Parameter, B: nn.Parameter, scaling: float, group: dict) -> None:
        grad_A = A.grad if A.grad is not None else torch.zeros_like(A)
        grad_B = B.grad if B.grad is not None else torch.zeros_like(B)
        grams = _Grams(A, B, group["delta"])
        if group["mode"] == "adamw":
            work = torch.promote_types(A.dtype, torch.float32)
            free_A, free_B, _ = _closed_form(grams, grad_A.double(), grad_B.double(), scaling, "zero")
            A_w, B_w = A.detach().to(work), B.detach().to(work)
            # g̃ = s (B g_A + g_B A), m x n, in one matmul plus one fused multiply-add
            equivalent = torch.addmm(B_w @ (scaling * free_A).to(work), (scaling * free_B).to(work), A_w)
            state = self.state[A]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(equivalent)
                state["exp_avg_sq"] = torch.zeros_like(equivalent)
            state["step"] += 1
            t = state["step"]
            beta1, beta2 = group["betas"]
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(equivalent, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(equivalent, equivalent, value=1 - beta2)
            denominator = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**t)).add_(group["eps"])  # √V̂ + ε
            adam = torch.div(exp_avg, denominator, out=denominator).mul_(1 / (1 - beta1**t))  # G = M̂ / (√V̂ + ε)
            del equivalent
            grad_A = scaling * (B_w.T @ adam)  # G as the full gradient: s Bᵀ G, s G Aᵀ
            grad_B = scaling * (adam @ A_w.T)
        new_A, new_B, _ = _closed_form(grams, grad_A.double(), grad_B.double(), scaling, "sylvester")
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay:
            A.mul_(1 - lr * weight_decay)
            B.mul_(1 - lr * weight_decay)
        A.sub_(new_A.to(A.dtype), alpha=lr)
        B.sub_(new_B.to(B.dtype), alpha=lr)

    def _adamw(self, p: nn.Parameter, group: dict) -> None:
        """torch.optim.AdamW's update, for the trainable parameters outside any (A, B) pair."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denominator, value=-lr / (1 - beta1**t))


@dataclass
class LoRAProOptions:
    """`--optimizer lora-pro --optimizer-options '{...}'`; fields as `LoRAPro`'s arguments.

    betas: Adam's (0.9, 0.999). eps: 1e-8. delta: pinv ridge δ, 1e-8. mode: "adamw" or "sgd".
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    delta: float = DELTA
    mode: str = "adamw"

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check(1.0, self.betas, self.eps, 0.0, self.delta, self.mode)


@register_optimizer("lora-pro", LoRAProOptions)
def lora_pro(model: nn.Module, lr: float, weight_decay: float, options: LoRAProOptions) -> LoRAPro:
    """LoRA-Pro over the model's LoRA pairs (plain AdamW for any other trainable parameter)."""
    return LoRAPro(model, lr=lr, betas=options.betas, eps=options.eps, weight_decay=weight_decay,
                   delta=options.delta, mode=options.mode)


__all__ = ["LoRAPro", "LoRAProOptions", "adjusted_gradients", "equivalent_gradient", "lora_pro_pairs",
           "solve_sylvester"]
