"""Group-wise asymmetric weight quantizer, LoRA-Rounding, and the Linear layer that holds the result.

Quantizer (per output row, per group of `group_size` input columns; b bits, q_max = 2^b - 1):
    s = (max W_g - min W_g) / q_max,   z = clamp(round(-min W_g / s), 0, q_max)
    codes = clamp(round(W / s) + z, 0, q_max)              (round-to-nearest, RTN)
    W_q  = s * (codes - z)
A last group narrower than `group_size` (in_features not divisible) uses only its real columns.

LoRA-Rounding (CBQ, arXiv 2312.07950, on AdaRound, arXiv 2004.10568): the rounding choice is learnt,
    W_soft = s * (clamp(floor(W / s0) + h(V) + z, 0, q_max) - z),   V = A1 A2,
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1,
    L_round = mean_ij (1 - |2 h(V_ij) - 1|^beta)   (AdaRound's form; beta annealed 20 -> 2),
with A1 (out x r), A2 (r x in): r (out + in) learnable rounding parameters instead of out * in.
After calibration the rounding is made hard, codes = clamp(floor(W / s0) + 1[V >= 0] + z, 0, q_max)
(h(V) >= 0.5 exactly when V >= 0), and A1, A2 are discarded. The integer part floor(W / s0) is
fixed at the initial step s0 (as in AdaRound); the step s = s0 * exp(log_s) is learnt per group.

Initialisation (`init`; the paper does not give one):
  "offset" (default): V = V0 + A1 A2 with V0 = h^-1(W / s0 - floor(W / s0)) frozen and A1 = 0, so
      W_soft = W and the hard rounding is round-to-nearest at the start; only the low-rank offset
      A1 A2 (still r (out + in) parameters) is learnt. A deviation from the paper's V = A1 A2: with
      the few steps a CPU run affords, a pure rank-r V starts from a nearly random hard rounding and
      ended far worse than RTN on the default model (held-out hidden-state error 10x RTN's).
  "svd": the paper's V = A1 A2, initialised by the best rank-r fit of V0 (the spec's choice).
  "zero": V = A1 A2 with A1 = 0 (h = 0.5 everywhere at the start).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.errors import ConfigError
from lorakit.core.linalg import truncated_svd

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch
SUPPORTED_BITS = range(2, 9)


def check_bits_group(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits!r} is not supported; use an integer from 2 to 8 (e.g. bits=4)")
    if not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ConfigError(f"group_size={group_size!r} is invalid; use a positive integer (e.g. 128) "
                          "or -1 for one group per output row")


def group_width(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else min(group_size, in_features)


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(out, n_groups) -> (out, in): each group's value repeated over its columns."""
    width = group_width(group_size, in_features)
    return per_group.repeat_interleave(width, dim=1)[:, :in_features]


def group_params(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max step s and integer zero-point z per (row, group), both (out, n_groups), float32."""
    w = weight.detach().float()
    width = group_width(group_size, w.shape[1])
    n_groups = math.ceil(w.shape[1] / width)
    # Replicate the last column into the padding: it changes neither the group's min nor its max.
    padded = F.pad(w, (0, n_groups * width - w.shape[1]), mode="replicate") if n_groups * width > w.shape[1] else w
    grouped = padded.view(w.shape[0], n_groups, width)
    low, high = grouped.amin(dim=2), grouped.amax(dim=2)
    q_max = 2 ** bits - 1
    scale = ((high - low) / q_max).clamp(min=1e-8)
    zero = torch.round(-low / scale).clamp(0, q_max)
    return scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_q = s (codes - z), float32, (out, in). The one formula every path (in memory, reload) uses."""
    in_features = codes.shape[1]
    return expand_groups(scale.float(), group_size, in_features) * (
        codes.float() - expand_groups(zero.float(), group_size, in_features))


def rtn_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest integer codes in [0, 2^b - 1], uint8, (out, in)."""
    in_features = weight.shape[1]
    s, z = expand_groups(scale, group_size, in_features), expand_groups(zero, group_size, in_features)
    return torch.clamp(torch.round(weight.detach().float() / s) + z, 0, 2 ** bits - 1).to(torch.uint8)


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(p: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """V with h(V) = p, p clipped to [eps, 1 - eps] (h reaches 0 and 1 only at +-infinity)."""
    p = p.clamp(eps, 1 - eps)
    return torch.logit((p - GAMMA) / (ZETA - GAMMA))


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """mean_ij (1 - |2 h_ij - 1|^beta): 0 when every h is 0 or 1, pushes h towards {0, 1}."""
    return (1 - (2 * h - 1).abs().pow(beta)).mean()


def beta_schedule(step: int, steps: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """AdaRound's annealing: None (no regulariser) during the first `warmup` fraction, then beta
    falls linearly from `start` to `end`."""
    first = int(warmup * steps)
    if step < first:
        return None
    return end + (start - end) * (1 - (step - first) / max(steps - first, 1))


class LoRARounding(nn.Module):
    """Fake-quantized Linear whose rounding (V = A1 A2) and per-group step are learnt.

    Wraps a Linear during calibration; `forward` uses W_soft (module docstring). `hard_codes()`
    returns the final integer codes and steps.
    """

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, rank: int, init: str = "offset") -> None:
        super().__init__()
        check_bits_group(bits, group_size)
        if rank < 1:
            raise ConfigError(f"rank={rank} is invalid; LoRA-Rounding needs rank >= 1 (e.g. rank=4)")
        self.linear, self.bits, self.group_size = linear, bits, group_size
        weight = linear.weight.detach().float()
        scale, zero = group_params(weight, bits, group_size)
        s = expand_groups(scale, group_size, weight.shape[1])
        self.register_buffer("scale0", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("floor", torch.floor(weight / s))
        z = expand_groups(zero, group_size, weight.shape[1])
        self.register_buffer("_floor_plus_zero", self.floor + z, persistent=False)
        self.register_buffer("_zero_full", z, persistent=False)
        self.h: torch.Tensor | None = None  # h(V) of the last forward (the regulariser reuses it)
        self.hard = False  # True: forward with the final rounding 1[V >= 0]
        self.log_step = nn.Parameter(torch.zeros_like(scale))
        rank = min(rank, *weight.shape)
        # V = V0 + A1 A2; V0 (frozen) is 0 except for init="offset"
        self.register_buffer("V0", torch.zeros(0), persistent=False)
        if init == "offset":
            # The rounding that reproduces W, frozen, plus a learnt low-rank offset (A1 = 0 at the start):
            # hard rounding starts as round-to-nearest (the library default; see the module docstring).
            self.V0 = inverse_rectified_sigmoid(weight / s - self.floor)
            a1 = torch.zeros(weight.shape[0], rank)
            a2 = torch.randn(rank, weight.shape[1], generator=torch.Generator().manual_seed(0)) / math.sqrt(rank)
        elif init == "svd":
            # Best rank-r fit of the V that makes W_soft = W at the start (the library's choice).
            target = inverse_rectified_sigmoid(weight / s - self.floor)
            U, S, Vh = truncated_svd(target, rank, niter=4)  # randomized: rounding noise has no spectral gap to resolve
            a1, a2 = U * S.sqrt(), S.sqrt()[:, None] * Vh
        elif init == "zero":
            a1 = torch.zeros(weight.shape[0], rank)
            a2 = torch.randn(rank, weight.shape[1], generator=torch.Generator().manual_seed(0)) / math.sqrt(rank)
        else:
            raise ConfigError(f"rounding_init={init!r} is unknown; use 'offset', 'svd' or 'zero'")
        self.A1, self.A2 = nn.Parameter(a1.contiguous()), nn.Parameter(a2.contiguous())

    def step(self) -> torch.Tensor:
        return self.scale0 * self.log_step.exp()

    def v(self) -> torch.Tensor:
        low_rank = self.A1 @ self.A2
        return low_rank + self.V0 if self.V0.numel() else low_rank

    def soft_h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v())

    def soft_weight(self, h: torch.Tensor | None = None) -> torch.Tensor:
        h = self.soft_h() if h is None else h
        s = expand_groups(self.step(), self.group_size, self.floor.shape[1])
        return s * (torch.clamp(self._floor_plus_zero + h, 0, 2 ** self.bits - 1) - self._zero_full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.h = (self.v() >= 0).float() if self.hard else self.soft_h()
        weight = self.soft_weight(self.h)
        bias = None if self.linear.bias is None else self.linear.bias.float()
        return F.linear(x.float(), weight, bias).to(x.dtype)

    @torch.no_grad()
    def hard_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes uint8 (out, in), step (out, n_groups), zero (out, n_groups)) with h = 1[V >= 0]."""
        up = (self.v() >= 0).float()
        z = expand_groups(self.zero, self.group_size, self.floor.shape[1])
        codes = torch.clamp(self.floor + up + z, 0, 2 ** self.bits - 1).to(torch.uint8)
        return codes, self.step().detach().clone(), self.zero.clone()


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose weight is s (codes - z), dequantised once from integer codes.

    `codes` (uint8, out x in), `scales` (float32) and `zeros` (uint8, out x n_groups) are kept as
    non-persistent buffers (the model's state_dict keeps its usual keys); `weight` is the
    dequantised weight in the layer's dtype, frozen. Built the same way in memory and on reload,
    so both give bitwise-identical outputs.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias=bias is not None, device=codes.device, dtype=dtype)
        self.bits, self.group_size = bits, group_size
        self.register_buffer("codes", codes.to(torch.uint8), persistent=False)
        self.register_buffer("scales", scales.float(), persistent=False)
        self.register_buffer("zeros", zeros.to(torch.uint8), persistent=False)
        with torch.no_grad():
            self.weight.copy_(dequantize(self.codes, self.scales, self.zeros, group_size).to(dtype))
            if bias is not None:
                self.bias.copy_(bias.detach())
        self.weight.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values < 2^bits) as a little-endian bit stream of `bits` bits each, uint8 1-D."""
    flat = codes.reshape(-1).to(torch.int32)
    planes = (flat[:, None] >> torch.arange(bits, dtype=torch.int32)) & 1
    stream = planes.reshape(-1)
    stream = F.pad(stream, (0, -stream.numel() % 8))
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of `shape`."""
    count = math.prod(shape)
    stream = ((packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[: count * bits]
    values = (stream.view(count, bits) << torch.arange(bits, dtype=torch.int32)).sum(dim=1)
    return values.to(torch.uint8).view(shape)
