"""Weight-only post-training quantization: round-to-nearest (RTN) and CBQ (arXiv 2312.07950).

CBQ = coarse-to-fine outlier pre-processing (`cfp`) + LoRA-Rounding (`quantizer.LoRARounding`) +
cross-block reconstruction: the decoder blocks are optimised in sliding windows of `window`
consecutive blocks that overlap by `overlap` blocks (default 2 and 1: (0,1), (1,2), ...). For a window
(i..j), the input is the output of the already-quantized prefix (blocks < i, hard-rounded) on the
calibration tokens, the target is the full-precision model's output of block j on the same tokens,
and the learnables are every Linear's LoRA-Rounding factors and per-group steps in blocks i..j
(a block shared with the previous window keeps its current values). The loss per token is
    E = mean (h_fp - h_q)^2 + kl_weight KL(softmax(h_fp) || softmax(h_q))
(softmax over the hidden dimension; padding masked out) and the minimised objective is
E / E_start + round_weight L_round(beta) (E_start: the window's E with its starting hard rounding, so
that one round_weight suits every window whatever the scale of its hidden states), with Adam; a block is
hard-rounded (folded into integer codes) once the window has moved past it.
Weight-only (W_b A16): the paper's activation quantizers (W4A4/W4A8) are not implemented, so its
activation step sizes are absent; activation-outlier scaling still runs (it reshapes W before
quantization), as CFP prescribes.
Deviations, all library choices where the paper was not available: the "homologous" input pairing
is taken as (quantized-prefix input -> full-precision target), as OmniQuant does; the integer part
floor(W / s0) is fixed at the initial step; V = V0 + A1 A2 with a frozen round-to-nearest V0
(`rounding_init="offset"`, see `quantizer`; "svd" is the paper's V = A1 A2); a window whose
hard-rounded calibration loss ends above its starting value keeps its starting rounding and steps;
weight-outlier truncation is off by default (`weight_outliers=False`): on the default model CFP
marks ~0.25% of the weights as outliers and truncating them alone raises full-precision perplexity
on GSM8K answers from 7.3 to 31. Activation-outlier scaling (on) leaves the outputs unchanged.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers, requires_grad_flags
from lorakit.quant import cfp
from lorakit.quant.quantizer import (
    LoRARounding,
    QuantizedLinear,
    beta_schedule,
    check_bits_group,
    group_params,
    rounding_regulariser,
    rtn_codes,
)

STATE_ATTR = "_lorakit_quant"  # {"bits", "group_size", "method", "modified", "report"} kept on the model
METHODS = ("cbq", "rtn")


def window_schedule(num_blocks: int, window: int = 2, overlap: int = 1) -> list[tuple[int, ...]]:
    """Windows of `window` consecutive block indices, consecutive windows sharing `overlap` blocks;
    the last window may be shorter. 5 blocks, (2, 1) -> (0,1),(1,2),(2,3),(3,4); (3, 1) -> (0,1,2),(2,3,4)."""
    if window < 1 or not 0 <= overlap < window:
        raise ConfigError(f"window={window}, overlap={overlap} is invalid; need window >= 1 and 0 <= overlap < window "
                          "(CBQ's default: window=2, overlap=1)")
    stride, windows, start = window - overlap, [], 0
    while True:
        windows.append(tuple(range(start, min(start + window, num_blocks))))
        if start + window >= num_blocks:
            return windows
        start += stride


def reconstruction_loss(h_fp: torch.Tensor, h_q: torch.Tensor, mask: torch.Tensor | None = None,
                        kl_weight: float = 1.0) -> torch.Tensor:
    """mean over tokens of mean_d (h_fp - h_q)^2 + kl_weight KL(softmax(h_fp) || softmax(h_q)); `mask` (batch, seq)
    marks real tokens."""
    h_fp, h_q = h_fp.float(), h_q.float()
    per_token = (h_fp - h_q).pow(2).mean(dim=-1)
    if kl_weight:
        log_p, log_q = F.log_softmax(h_fp, dim=-1), F.log_softmax(h_q, dim=-1)
        per_token = per_token + kl_weight * (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, blocks): the longest ModuleList of same-class modules (a transformer's decoder layers)."""
    best = None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                if best is None or len(module) > len(best[1]):
                    best = (path, module)
    return best


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, data: Iterable[dict]) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(hidden states entering the first block, that call's keyword arguments, token mask) per batch."""
    device = next(model.parameters()).device
    captured: list = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None), kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        captured.append((hidden.detach(), kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    batches = []
    try:
        for batch in data:
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            if "input_ids" not in inputs:
                raise ConfigError("calibration batches need 'input_ids' (dicts like lorakit.inject(..., data=...) takes)")
            try:
                model(**inputs, use_cache=False)
            except _Stop:
                pass
            mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
            batches.append(mask)
    finally:
        handle.remove()
    if not captured:
        raise ConfigError("CBQ needs calibration data: pass data=[{'input_ids': ..., 'attention_mask': ...}, ...] "
                          "(or method='rtn', which needs none)")
    return [(h, kw, m) for (h, kw), m in zip(captured, batches)]


def _run(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return _block_output(block(hidden, **kwargs))


@torch.no_grad()
def _channel_maxima(block: nn.Module, inputs: list[tuple[torch.Tensor, dict, torch.Tensor]]):
    """{norm: (consumer linears, per-channel max |X|)} for every norm whose output feeds Linear layers directly."""
    norms = {id(m): m for m in block.modules()
             if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.dim() == 1}
    produced, consumers, maxima, handles = {}, {}, {}, []

    def norm_hook(module, args, out):
        produced[id(out)] = (id(module), out)  # holding `out` keeps its id from being reused in this pass

    def linear_hook(module, args):
        x = args[0]
        owner, tensor = produced.get(id(x), (None, None))
        if tensor is x:
            consumers.setdefault(owner, {})[id(module)] = module
            channel = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            maxima[owner] = torch.maximum(maxima[owner], channel) if owner in maxima else channel

    for m in norms.values():
        handles.append(m.register_forward_hook(norm_hook))
    for _, linear in _linears(block):
        handles.append(linear.register_forward_pre_hook(linear_hook))
    try:
        for hidden, kwargs, _ in inputs:
            produced.clear()
            _run(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return {norms[k]: (list(consumers[k].values()), maxima[k]) for k in consumers}


@torch.no_grad()
def preprocess_block(block: nn.Module, inputs, options: dict) -> dict:
    """CFP on one block: weight outliers truncated, then activation-outlier channels scaled into the norms (kept
    only when the block's output is unchanged). Truncating first keeps the columns that the scaling enlarges
    from being clipped as weight outliers. Returns counts and the norms it changed."""
    truncated = 0
    if options["weight_outliers"]:
        for _, linear in _linears(block):
            truncated += cfp.truncate_weight_outliers(linear.weight.data, options["lambda1"], options["lambda2"])
    changed_norms, channels = [], 0
    if options["activation_outliers"]:
        hidden, kwargs, _ = inputs[0]
        before = _run(block, hidden, kwargs)
        for norm, (linears, channel_max) in _channel_maxima(block, inputs).items():
            scales = cfp.activation_scales(channel_max, options["lambda1"], options["lambda2"])
            if bool((scales == 1).all()):
                continue
            cfp.fold_activation_scales(norm, linears, scales)
            after = _run(block, hidden, kwargs)
            if (after - before).abs().max() > 1e-3 * before.abs().max().clamp(min=1e-6):
                cfp.fold_activation_scales(norm, linears, 1 / scales)  # a norm that does not scale by its gain
                continue
            changed_norms.append(norm)
            channels += int((scales != 1).sum())
    return {"scaled_channels": channels, "truncated_weights": truncated, "norms": changed_norms}


def _quantized_from_rtn(linear: nn.Linear, bits: int, group_size: int) -> QuantizedLinear:
    scale, zero = group_params(linear.weight, bits, group_size)
    codes = rtn_codes(linear.weight, scale, zero, bits, group_size)
    return QuantizedLinear(codes, scale, zero, bits, group_size, linear.bias, linear.weight.dtype)


def _harden(block: nn.Module) -> None:
    for path, module in list(block.named_modules()):
        if isinstance(module, LoRARounding):
            codes, scales, zeros = module.hard_codes()
            linear = module.linear
            _set_child(block, path, QuantizedLinear(codes, scales, zeros, module.bits, module.group_size,
                                                    linear.bias, linear.weight.dtype))


def quantize(model: nn.Module, bits: int = 4, group_size: int = 128, data: Iterable[dict] | None = None, *,
             method: str = "cbq", window: int = 2, overlap: int = 1, epochs: int = 2, rank: int = 4,
             lr: float = 1e-2, step_lr: float = 1e-3, kl_weight: float = 1.0, round_weight: float = 1.0,
             weight_outliers: bool = False, activation_outliers: bool = True, lambda1: float = cfp.LAMBDA1,
             lambda2: float = cfp.LAMBDA2, rounding_init: str = "offset", out_dir=None, progress: bool = True) -> nn.Module:
    """Quantize every Linear of the model's decoder blocks to `bits`-bit integer codes with per-(row, group of
    `group_size` inputs) steps and zero-points, in place; returns the model.

    method="rtn": round-to-nearest (no data). method="cbq": CFP + LoRA-Rounding + cross-block reconstruction
    on `data` (an iterable of dicts with input_ids / attention_mask, as `lorakit.inject(..., data=...)` takes;
    labels are ignored). Each window runs `epochs` passes over the batches (one Adam step per batch) with
    rounding rank `rank`, lr `lr` for the rounding factors and `step_lr` for the log step sizes. The
    embeddings and the output head stay in full precision. With `out_dir`, the result is also saved
    (`lorakit.quant.save_quantized`). Quantized layers are `QuantizedLinear` (an nn.Linear holding the
    dequantised weight and its integer codes).
    """
    check_bits_group(bits, group_size)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(METHODS)}")
    if any(True for _ in adapted_layers(model)):
        raise ConfigError("the model holds adapters; merge them (lorakit.merge) and lorakit.unload it before quantizing")
    if epochs < 1 or rank < 1:
        raise ConfigError(f"epochs={epochs}, rank={rank}: both must be >= 1 (defaults: epochs=2, rank=4)")
    found = decoder_blocks(model)
    started = time.perf_counter()
    options = dict(window=window, overlap=overlap, epochs=epochs, rank=rank, lr=lr, step_lr=step_lr, kl_weight=kl_weight,
                   round_weight=round_weight, weight_outliers=weight_outliers, activation_outliers=activation_outliers,
                   lambda1=lambda1, lambda2=lambda2, rounding_init=rounding_init)
    report: dict = {"method": method, "bits": bits, "group_size": group_size}
    modified: set[str] = set()
    if method == "rtn":
        if found is None:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            paths = [p for p, m in _linears(model) if m is not head]
        else:
            paths = [f"{found[0]}.{p}" for p, _ in _linears(found[1])]
        for path in tqdm(paths, desc="quantizing (rtn)", disable=not progress):
            _set_child(model, path, _quantized_from_rtn(model.get_submodule(path), bits, group_size))
        report["layers"] = len(paths)
    else:
        if found is None:
            raise ConfigError("CBQ needs a model made of repeated blocks (a transformer's decoder layers); "
                              "none was found: use method='rtn'")
        if data is None:
            raise ConfigError("method='cbq' needs calibration data: pass data=[batch dicts] (or use method='rtn')")
        report.update(options=options, windows=[])
        flags = requires_grad_flags(model)
        was_training = model.training
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        try:
            _cbq(model, found, list(data), bits, group_size, options, report, modified, progress)
        finally:
            frozen = {id(m.weight) for m in model.modules() if isinstance(m, QuantizedLinear)}
            for param in model.parameters():  # quantized weights stay frozen; the rest as they were
                param.requires_grad_(flags.get(id(param), False) and id(param) not in frozen)
            model.train(was_training)
    report["seconds"] = round(time.perf_counter() - started, 2)
    object.__setattr__(model, STATE_ATTR, {"method": method, "bits": bits, "group_size": group_size,
                                           "modified": sorted(modified), "report": report})
    if out_dir is not None:
        from lorakit.quant.storage import save_quantized

        save_quantized(model, out_dir)
    return model


def _cbq(model, found, data, bits, group_size, options, report, modified, progress) -> None:
    blocks_path, blocks = found
    inputs = capture_block_inputs(model, blocks[0], data)
    with torch.no_grad():  # full-precision hidden states entering every block, and leaving the last
        fp = [[h for h, _, _ in inputs]]
        for block in blocks:
            fp.append([_run(block, h, kw) for h, (_, kw, _) in zip(fp[-1], inputs)])
    names = {id(m): n for n, m in model.named_modules()}
    q_hidden, q_start, active = list(fp[0]), 0, {}
    windows = window_schedule(len(blocks), options["window"], options["overlap"])
    bar = tqdm(windows, desc=f"CBQ W{bits} g{group_size}", disable=not progress)
    for win in bar:
        for b in sorted(active):
            if b < win[0]:
                _harden(blocks[b])
                del active[b]
        with torch.no_grad():
            for b in range(q_start, win[0]):
                q_hidden = [_run(blocks[b], h, kw) for h, (_, kw, _) in zip(q_hidden, inputs)]
        q_start = win[0]
        for b in win:
            if b in active:
                continue
            block_inputs = [(h, kw, m) for h, (_, kw, m) in zip(fp[b], inputs)]
            pre = preprocess_block(blocks[b], block_inputs, options)
            modified.update(f"{names[id(norm)]}.{p}" for norm in pre["norms"] for p, _ in norm.named_parameters())
            report.setdefault("cfp", {})[b] = {k: v for k, v in pre.items() if k != "norms"}
            active[b] = [_wrap(blocks[b], path, bits, group_size, options) for path, _ in _linears(blocks[b])]
        rounding = [r for b in win for r in active[b]]
        optimiser = torch.optim.Adam([
            {"params": [p for r in rounding for p in (r.A1, r.A2)], "lr": options["lr"]},
            {"params": [r.log_step for r in rounding], "lr": options["step_lr"]},
        ])
        steps = options["epochs"] * len(inputs)

        def window_loss(index: int) -> torch.Tensor:
            _, kwargs, mask = inputs[index]
            hidden = q_hidden[index]
            for b in win:
                hidden = _run(blocks[b], hidden, kwargs)
            return reconstruction_loss(fp[win[-1] + 1][index], hidden, mask, options["kl_weight"])

        def hard_loss() -> float:
            for r in rounding:
                r.hard = True
            with torch.no_grad():
                value = sum(window_loss(i).item() for i in range(len(inputs))) / len(inputs)
            for r in rounding:
                r.hard = False
            return value

        start_loss = hard_loss()  # with the starting rounding (round-to-nearest for rounding_init="offset")
        start_state = [[p.detach().clone() for p in (r.A1, r.A2, r.log_step)] for r in rounding]
        last = None
        for step in range(steps):
            loss = window_loss(step % len(inputs))
            last = loss.item()
            beta = beta_schedule(step, steps)
            total = loss / max(start_loss, 1e-12)  # scale-free: round_weight means the same in every window
            if beta is not None and options["round_weight"]:
                total = total + options["round_weight"] * sum(rounding_regulariser(r.h, beta) for r in rounding) / len(rounding)
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
        end_loss = hard_loss()
        if end_loss > start_loss:  # keep the window's starting rounding when calibration made it worse
            with torch.no_grad():
                for r, saved in zip(rounding, start_state):
                    for p, value in zip((r.A1, r.A2, r.log_step), saved):
                        p.copy_(value)
        report["windows"].append({"blocks": list(win), "loss_start": start_loss, "loss_soft_last": last, "loss_end": end_loss,
                                  "kept": end_loss <= start_loss})
        bar.set_postfix(loss=f"{start_loss:.4g}->{end_loss:.4g}")
    for b in sorted(active):
        _harden(blocks[b])
    report["cfp"] = {str(k): v for k, v in report.get("cfp", {}).items()}
    report["blocks_path"] = blocks_path


def _wrap(block: nn.Module, path: str, bits: int, group_size: int, options: dict) -> LoRARounding:
    rounding = LoRARounding(block.get_submodule(path), bits, group_size, options["rank"], options["rounding_init"])
    _set_child(block, path, rounding)
    return rounding

