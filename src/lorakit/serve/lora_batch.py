"""Batched heterogeneous LoRA: one forward of the base model, a different adapter per batch row.

S-LoRA (Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv 2311.03285):
for a targeted layer with base weight W, row t of the batch with adapter a(t) gets

    Y_t = X_t W^T + s_a B_a A_a X_t          A_a in R^{r_a x in}, B_a in R^{out x r_a}, s_a its scale,

the base GEMM X W^T shared by the whole batch, and Y_t = X_t W^T exactly for a row without adapter.
Rows are batch rows of any shape (N, ..., in): (batch, seq, in) at prefill, (batch, 1, in) at
decode, or S-LoRA's token matrix (T, in). Three evaluations of the LoRA term, which agree:

- `lora_loop`: row by row (the reference);
- `lora_segment` (mode "segment", the default): group rows by adapter; per adapter present one
  shrink H = X_rows A^T and one expand H (s B)^T, index_add-ed into the base output. Every row uses
  exactly its own rank, no padding, no per-row copy of the factors;
- `lora_padded_bmm` (mode "bmm"): pad every A to R rows and B to R columns with zeros, gather each
  row's factors and run two torch.bmm. `MultiLoraModel` buckets ranks by power of two (r = 5..8
  pad to 8, 9..16 to 16, ...) instead of padding to the batch's largest rank. Padding rows are
  exactly 0, so the result is exact; the cost is the padded FLOPs and the per-row gather copy.

`LoraWeights` is one adapter in serving form (host memory, fp32); `MultiLoraModel` puts forward
hooks on the targeted nn.Linear layers of an unmodified HF model (the union of every active
adapter's modules) and routes rows to adapters inside `with multi.rows([...]):`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.config import require_choice
from lorakit.core.errors import LorakitError
from lorakit.core.io import KEY_PREFIX, read_adapter_config, read_adapter_tensors
from lorakit.core.registry import weight_initialiser
from lorakit.serve.errors import CorruptAdapter, UnknownAdapter

MODES = ("segment", "bmm")
Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scale
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# --- the three evaluations, on rows (dim 0) ------------------------------------------------------

def rank_bucket(rank: int) -> int:
    """The power of two a rank is padded to in mode "bmm" (1, 2, 4, 8, 16, ...)."""
    return 1 << max(rank - 1, 0).bit_length()


def _groups(ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Adapter id -> row indices (ascending), for every id >= 0 present (-1 = no adapter)."""
    return {int(a): (ids == a).nonzero().squeeze(1) for a in ids.unique().tolist() if a >= 0}


def lora_loop(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors]) -> torch.Tensor:
    """The LoRA term row by row: out[t] = s B A x[t] for adapter ids[t], 0 where ids[t] = -1."""
    out = x.new_zeros(*x.shape[:-1], adapters[0][1].shape[0])
    for t, a in enumerate(ids.tolist()):
        if a >= 0:
            A, B, scale = adapters[a]
            out[t] = scale * (x[t] @ A.T @ B.T)
    return out


def segment_into(out: torch.Tensor, x: torch.Tensor, groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """out[rows] += (x[rows] A^T) sB^T for each (rows, A, sB): one shrink + expand per adapter."""
    for rows, A, scaled_B in groups:
        delta = F.linear(F.linear(x.index_select(0, rows), A), scaled_B)
        out = out.index_add_(0, rows, delta) if not torch.is_grad_enabled() else out.index_add(0, rows, delta)
    return out


def lora_segment(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors]) -> torch.Tensor:
    """The LoRA term by segments (S-LoRA's gather without padding)."""
    out = x.new_zeros(*x.shape[:-1], adapters[0][1].shape[0])
    groups = [(rows, adapters[a][0], adapters[a][1] * adapters[a][2]) for a, rows in _groups(ids).items()]
    return segment_into(out, x, groups)


def pad_factors(adapters: Sequence[Factors], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (k, rank, in) of A and (k, out, rank) of s B, zero-padded beyond each adapter's rank."""
    A0, B0, _ = adapters[0]
    A_stack = A0.new_zeros(len(adapters), rank, A0.shape[1])
    B_stack = B0.new_zeros(len(adapters), B0.shape[0], rank)
    for i, (A, B, scale) in enumerate(adapters):
        if A.shape[0] > rank:
            raise ValueError(f"adapter {i} has rank {A.shape[0]}, above the padded rank {rank}")
        A_stack[i, : A.shape[0]] = A
        B_stack[i, :, : A.shape[0]] = B * scale
    return A_stack, B_stack


def bmm_into(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
             A_stack: torch.Tensor, B_stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out[rows] += bmm(bmm(x[rows], A_stack[slots]^T), B_stack[slots]^T); returns (out, shrink)."""
    xs = x.index_select(0, rows)
    n = xs.shape[0]
    h = torch.bmm(xs.reshape(n, -1, xs.shape[-1]), A_stack.index_select(0, slots).transpose(1, 2))
    y = torch.bmm(h, B_stack.index_select(0, slots).transpose(1, 2)).reshape(*xs.shape[:-1], B_stack.shape[1])
    out = out.index_add_(0, rows, y) if not torch.is_grad_enabled() else out.index_add(0, rows, y)
    return out, h.reshape(*xs.shape[:-1], A_stack.shape[1])


def lora_padded_bmm(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors], rank: int | None = None,
                    return_shrink: bool = False):
    """The LoRA term with every adapter padded to `rank` (default: the largest) and two bmm.
    With `return_shrink`, also the shrink H (rows with an adapter, in row order, padded width)."""
    rank = rank or max(A.shape[0] for A, _, _ in adapters)
    A_stack, B_stack = pad_factors(adapters, rank)
    rows = (ids >= 0).nonzero().squeeze(1)
    out = x.new_zeros(*x.shape[:-1], B_stack.shape[1])
    out, h = bmm_into(out, x, rows, ids.index_select(0, rows), A_stack, B_stack)
    return (out, h) if return_shrink else out


# --- one adapter in serving form ------------------------------------------------------------------

@dataclass
class LoraWeights:
    """An adapter as (A, B, scale) per module path of the base model, fp32 on the host.

    `conversion_error` is the largest per-layer relative Frobenius error ||dW - s B A|| / ||dW|| of
    an adapter converted from another family (0 for a LoRA file read as it is).
    """

    name: str
    modules: dict[str, Factors]
    source: str | None = None
    conversion_error: float = 0.0
    nbytes: int = field(init=False)
    max_rank: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(A.nbytes + B.nbytes for A, B, _ in self.modules.values())
        self.max_rank = max((A.shape[0] for A, _, _ in self.modules.values()), default=0)

    @classmethod
    def from_folder(cls, name: str, path: str | Path, base_model: nn.Module | None = None) -> "LoraWeights":
        """Read a LoRA folder (PEFT's or lorakit's): per module r and alpha from `r`/`lora_alpha` or
        their `rank_pattern`/`alpha_pattern` overrides, s = alpha / r (alpha / sqrt(r) with
        `use_rslora`), tensors `base_model.model.<path>.lora_A.weight` (r, in) / `lora_B.weight`
        (out, r). Safetensors only; never unpickles.

        An adapter that is not plain B A factors (DoRA, PEFT-style PiSSA/OLoRA files, any other
        lorakit family) is converted when `base_model` is given: each layer's exact update dW
        (`lorakit.export.adapter_deltas`, measured against the untouched base, which stays
        untouched) is replaced by its best rank-R approximation (truncated SVD, scale 1), R being
        the adapter's own rank (`r`, per module for DoRA; the numerical rank of dW for a family
        without `r`). That is exact when rank(dW) <= R (VeRA, LoRA-XS, ...) and an approximation
        otherwise (DoRA, Bone/MiSS, ...): `conversion_error` says how close. Without `base_model`
        such a folder raises CorruptAdapter naming the `lorakit export` command that converts it.
        Anything unreadable raises CorruptAdapter, never another exception.
        """
        try:
            folder, config = read_adapter_config(path)
        except (LorakitError, OSError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptAdapter(f"adapter {name!r} at {str(path)!r} cannot be read: {err}") from None
        init = getattr(config, "init", None)
        plain = config.method == "lora" and not config.use_dora and (not isinstance(init, str) or weight_initialiser(init) is None)
        if plain:
            weights = cls(name, _read_lora(name, folder, config), source=str(folder))
        elif base_model is None:
            rank = getattr(config, "r", None)
            kind = "DoRA" if getattr(config, "use_dora", False) else (
                f"LoRA with init={init!r} (factors relative to a rewritten W)" if config.method == "lora" else repr(config.method))
            raise CorruptAdapter(
                f"adapter {name!r} at {str(folder)!r} is a {kind} adapter, not plain LoRA factors, so it cannot be "
                f"served as it is. Convert it once: `lorakit export {folder} OUT --to lora --rank {rank or 'R'}` and "
                "serve OUT (or give the adapter store the base model, which converts it on load)")
        else:
            weights = _converted(name, folder, config, base_model)
        if base_model is not None:
            check_fits(weights, base_model)
        return weights


def _read_lora(name: str, folder: Path, config) -> dict[str, Factors]:
    try:
        tensors = read_adapter_tensors(folder)
    except LorakitError as err:
        raise CorruptAdapter(f"adapter {name!r}: {err}") from None
    pairs: dict[str, list[torch.Tensor | None]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        slot = next((i for i, suffix in enumerate(_SUFFIXES) if rest is not None and rest.endswith(suffix)), None)
        if slot is None:
            unexpected.append(key)
        else:
            pairs.setdefault(rest[: -len(_SUFFIXES[slot])], [None, None])[slot] = tensor
    where = f"adapter {name!r} ({folder})"
    if unexpected:
        raise CorruptAdapter(f"{where} holds tensors a LoRA server does not apply, e.g. {sorted(unexpected)[:3]} "
                             "(biases, embedding LoRA, modules_to_save); export it without them")
    if not pairs:
        raise CorruptAdapter(f"{where} holds no lora_A/lora_B tensors")
    modules = {}
    for path, (A, B) in sorted(pairs.items()):
        if A is None or B is None:
            raise CorruptAdapter(f"{where}: {path} has lora_{'A' if A is None else 'B'}.weight missing")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CorruptAdapter(f"{where}: {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                 "not (r, in) and (out, r)")
        if not A.is_floating_point() or not B.is_floating_point():
            raise CorruptAdapter(f"{where}: {path} holds {A.dtype}/{B.dtype} tensors, not floating point")
        rank, alpha = config.rank_and_alpha(path)
        if A.shape[0] != rank:
            raise CorruptAdapter(f"{where}: {path} has rank {A.shape[0]} in the file but r={rank} in "
                                 "adapter_config.json (r / rank_pattern); the folder's files do not belong together")
        A, B = A.float().contiguous(), B.float().contiguous()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CorruptAdapter(f"{where}: {path} holds NaN or infinite values")
        modules[path] = (A, B, float(config.scaling(rank, alpha)))
    return modules


def _converted(name: str, folder: Path, config, base_model: nn.Module) -> LoraWeights:
    """Any lorakit family as LoRA factors (truncated SVD of each layer's dW at the adapter's rank)."""
    from lorakit.export import adapter_deltas
    from lorakit.export.svd import low_rank_factors, relative_error

    init = getattr(config, "init", None)
    rewrites = isinstance(init, str) and weight_initialiser(init) is not None
    shell = _model_copy(base_model, share_weights=not rewrites)
    modules, worst = {}, 0.0
    try:
        for path, _, delta, _ in adapter_deltas(shell, folder, config):
            rank = _conversion_rank(config, path, delta)
            B, A = low_rank_factors(delta, rank)
            worst = max(worst, relative_error(delta, B @ A))
            modules[path] = (A.float().contiguous(), B.float().contiguous(), 1.0)
    except (LorakitError, RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CorruptAdapter(f"adapter {name!r} ({folder}) could not be converted to LoRA: {err}") from None
    if not modules:
        raise CorruptAdapter(f"adapter {name!r} ({folder}) adapts no layer")
    return LoraWeights(name, modules, source=str(folder), conversion_error=worst)


def _conversion_rank(config, path: str, delta: torch.Tensor) -> int:
    if hasattr(config, "rank_and_alpha"):
        rank = config.rank_and_alpha(path)[0]
    else:
        rank = getattr(config, "r", None)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        rank = max(int(torch.linalg.matrix_rank(delta)), 1)
    return min(rank, *delta.shape)


def _model_copy(model: nn.Module, share_weights: bool) -> nn.Module:
    """A copy of the module tree (so a conversion's temporary injection never touches the served
    model), sharing its parameters and buffers unless the conversion rewrites weights."""
    memo = {}
    if share_weights:
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def check_fits(weights: LoraWeights, model: nn.Module) -> None:
    """CorruptAdapter unless every module of `weights` is an nn.Linear of `model` of the right shape."""
    for path, (A, B, _) in weights.modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            raise CorruptAdapter(f"adapter {weights.name!r} adapts {path!r}, which is {found} in this model, not an "
                                 "nn.Linear; was it trained on another base model?")
        if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
            raise CorruptAdapter(
                f"adapter {weights.name!r}: {path} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the layer is "
                f"{module.in_features} -> {module.out_features}; was it trained on another base model?")


# --- many adapters on one model -------------------------------------------------------------------

@dataclass
class _Route:
    """The rows of one `rows()` block: adapter name -> its row indices (on the model's device)."""

    batch: int
    groups: dict[str, torch.Tensor]
    buckets: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def bucket_rows(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, slot of each row in the bucket's stack) for a bucket whose stack holds `names`."""
        if names not in self.buckets:
            present = [(slot, self.groups[n]) for slot, n in enumerate(names) if n in self.groups]
            if not present:
                self.buckets[names] = None
            else:
                rows = torch.cat([r for _, r in present])
                slots = torch.cat([torch.full_like(r, slot) for slot, r in present])
                self.buckets[names] = (rows, slots)
        return self.buckets[names]


class MultiLoraModel:
    """Batched heterogeneous LoRA on an unmodified HF model, through forward hooks on its nn.Linear
    layers (the model's structure, weights and state dict are unchanged; `close()` removes the hooks).

        multi = MultiLoraModel(model)            # mode "segment" (default) or "bmm"
        multi.activate(LoraWeights.from_folder("a", path_a))
        with multi.rows(["a", None, "b"]):       # batch row i uses adapter i; None: the base alone
            logits = model(input_ids).logits

    Adapters of any ranks and any target modules coexist; a row whose adapter does not target a
    layer gets that layer's base output. Activated factors live on each layer's device in its dtype,
    with the scale folded into B (s B); the LoRA term is computed in that dtype. Not thread-safe:
    one thread (the engine's loop) activates, deactivates and runs forwards.
    """

    def __init__(self, model: nn.Module, mode: str = "segment"):
        require_choice("mode", mode, MODES)
        self.model = model
        self.mode = mode
        self.active: dict[str, LoraWeights] = {}
        self._device: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # name -> path -> (A, sB)
        self._users: dict[str, list[str]] = {}  # path -> active adapters adapting it
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._stacks: dict[str, dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]] = {}
        self._route: _Route | None = None

    @property
    def device_bytes(self) -> int:
        """Bytes the activated adapters' factors take on the device(s)."""
        return sum(A.nbytes + B.nbytes for mods in self._device.values() for A, B in mods.values())

    def activate(self, weights: LoraWeights) -> None:
        """Copy `weights` next to the layers it adapts (replacing an active adapter of that name)."""
        check_fits(weights, self.model)
        if weights.name in self.active:
            self.deactivate(weights.name)
        copies = {}
        for path, (A, B, scale) in weights.modules.items():
            base = self.model.get_submodule(path).weight
            copies[path] = (A.to(base.device, base.dtype), (B * scale).to(base.device, base.dtype))
        self.active[weights.name] = weights
        self._device[weights.name] = copies
        for path in copies:
            self._users.setdefault(path, []).append(weights.name)
            self._stacks.pop(path, None)
            if path not in self._hooks:
                self._hooks[path] = self.model.get_submodule(path).register_forward_hook(self._hook_for(path))

    def deactivate(self, name: str) -> None:
        if name not in self.active:
            raise UnknownAdapter(f"adapter {name!r} is not active; active: {sorted(self.active) or 'none'}")
        del self.active[name]
        for path in self._device.pop(name):
            self._users[path].remove(name)
            self._stacks.pop(path, None)
            if not self._users[path]:
                del self._users[path]
                self._hooks.pop(path).remove()

    def close(self) -> None:
        """Deactivate everything and remove every hook: the model is plain again."""
        for name in list(self.active):
            self.deactivate(name)

    @contextlib.contextmanager
    def rows(self, row_adapters: Sequence[str | None]) -> Iterator[None]:
        """Forwards inside use adapter `row_adapters[i]` for batch row i (None: base output only)."""
        missing = sorted({n for n in row_adapters if n is not None and n not in self.active})
        if missing:
            raise UnknownAdapter(f"adapter(s) {missing} are not active; activate() them first "
                                 f"(active: {sorted(self.active) or 'none'})")
        device = next(self.model.parameters()).device
        order = list(dict.fromkeys(n for n in row_adapters if n is not None))
        groups = {n: torch.tensor([i for i, m in enumerate(row_adapters) if m == n], device=device) for n in order}
        previous, self._route = self._route, _Route(len(row_adapters), groups)
        try:
            yield
        finally:
            self._route = previous

    # --- the hook ----------------------------------------------------------------------------
    def _hook_for(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return self._apply(path, args[0], output)
        return hook  # a plain function: copying the model (adapter conversion) never copies self

    def _apply(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        route = self._route
        if route is None or not route.groups:
            return None
        if x.shape[0] != route.batch:
            raise ValueError(f"{path}: the batch has {x.shape[0]} rows but rows() was given {route.batch} adapters")
        if self.mode == "segment":
            groups = [(rows, *self._device[name][path]) for name, rows in route.groups.items() if path in self._device[name]]
            return segment_into(out, x, groups)
        for names, A_stack, B_stack in self._bucket_stacks(path).values():
            selected = route.bucket_rows(names)
            if selected is not None:
                out, _ = bmm_into(out, x, *selected, A_stack, B_stack)
        return out

    def _bucket_stacks(self, path: str) -> dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]:
        """Per power-of-two rank bucket: the adapters adapting `path` in it and their zero-padded
        factor stacks (rebuilt only when an adapter adapting `path` is (de)activated)."""
        if path not in self._stacks:
            by_bucket: dict[int, list[str]] = {}
            for name in self._users[path]:
                by_bucket.setdefault(rank_bucket(self._device[name][path][0].shape[0]), []).append(name)
            stacks = {}
            for bucket, names in by_bucket.items():
                factors = [(*self._device[n][path], 1.0) for n in names]
                stacks[bucket] = (tuple(names), *pad_factors(factors, bucket))
            self._stacks[path] = stacks
        return self._stacks[path]
