"""EVA, Explained Variance Adaptation: Paischer, Hauzenberger, Schmied, Alkin, Deisenroth,
Hochreiter, arXiv 2410.07170. A data-driven LoRA initialiser (`LoraConfig(init="eva")`).

For every targeted layer l (W: out x in, nominal rank r_l, cap k_l = round(rho r_l)) the frozen base
model runs over the batches and the layer's input activations X (tokens x in; only tokens with
`attention_mask == 1` and, with `use_label_mask`, `labels != label_mask_value`) feed an incremental
PCA (scikit-learn's IncrementalPCA as PEFT ports it, fp32/fp64):

    first batch:  X - mean(X) = U S V^T                                   keep the top k_l of (S, V)
    later batch:  [diag(S) V ; X_b - mean(X_b) ; c (mu - mean(X_b))] = U S V^T,  c = sqrt(n N_b / (n + N_b))
    explained-variance ratio  e_j = S_j^2 / (n_seen * sum_i var_i)

(randomized SVD, q = 2 k_l, 4 subspace iterations, seed 42, signs fixed by svd_flip on V, as PEFT).
Component j has converged when cos(V_new[j], V_old[j]) >= tau; a layer stops being hooked when its
first rank_l components have converged (and is hooked again if its allocation grows).
Rank redistribution, after every batch: the first k_l ratios of every layer are pooled and the
R = sum_l r_l largest win; rank_l = how many of them are layer l's (0 <= rank_l <= k_l), so rho = 1
keeps every layer at r_l. Layers with identical inputs (q/k/v) share one PCA; the layer holding it
gets the largest rank of its group. Batches cycle until every layer has converged.

Then A_l = V[:rank_l] (whiten: row j divided by sqrt(S_j)), B_l = 0, W untouched, so the adapted
model equals the base at init and saved files are plain LoRA files with `rank_pattern` (and
`alpha_pattern`). With `adjust_scaling_factors`, alpha_l = alpha * rank_l / r_l, so alpha_l / rank_l
stays alpha / r_l (with rsLoRA the scale then becomes alpha sqrt(rank_l) / r_l: not kept constant).
A layer with rank_l = 0 loses its adapter (it is given back its plain base layer) and leaves
`target_modules`, as in PEFT's `initialize_lora_eva_weights`.

Deviations from PEFT 0.21 (`peft/tuners/lora/eva.py`), none of which changes ranks or components
where PEFT runs: k_l is capped at the layer's input width (PEFT fails there, or caps rho > 1000 by
the largest parameter dimension); whitening never touches the shared PCA state (PEFT divides it in
place, so a second layer sharing an input is whitened twice); `max_batches` bounds the loop (PEFT
cycles forever when a layer never converges) and warns, naming the layers, if it is reached.

Speed (PEFT runs every pass through the whole model): a pass stops after the last layer still
collecting, and per batch the output of the block before the first one still collecting is kept
(`block_cache_mb`), so the next pass over that batch starts there. The model is frozen and the
batches repeat, so neither changes a rank or a component (tested against PEFT with blocks skipped).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.core.config import require_in_range, require_positive
from lorakit.core.errors import ConfigError
from lorakit.core.inject import CONFIGS_ATTR, adapted_layers, adapter_configs, disabled
from lorakit.core.layer import AdaptedLinear
from lorakit.core.registry import register_data_initialiser
from lorakit.rank.budget import RankBudget

PEFT_EVA_FIELDS = ("rho", "tau", "use_label_mask", "label_mask_value", "whiten", "adjust_scaling_factors")


@dataclass
class EvaOptions:
    """Options of `init="eva"` (`LoraConfig(init_options={...})`); defaults are PEFT's `EvaConfig`.

    rho: each layer may take up to round(rho * r) components (>= 1; 1 = no redistribution).
    tau: a component has converged when its cosine similarity to the previous batch's is >= tau, in (0, 1].
    use_label_mask: ignore tokens whose label is `label_mask_value` (prompt and padding tokens).
    label_mask_value: the label value of ignored tokens.
    whiten: divide component j by sqrt(S_j) (PEFT reports it helps for vision).
    adjust_scaling_factors: alpha_l = alpha * rank_l / r_l, so the scale alpha / r survives redistribution.
    max_batches: at most this many forward passes (the batches cycle); then a warning names the
        layers that have not converged and their current estimate is used.
    block_cache_mb: memory (on the model's device) for keeping, per batch, the output of the last
        decoder block before the first one still collecting, so the next pass over that batch
        resumes there instead of recomputing blocks whose layers have all converged; 0 turns it off.
        Results are identical either way (the model is frozen and the batches repeat).
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True
    max_batches: int = 1000
    block_cache_mb: float = 1024.0

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not self.rho >= 1.0:
            raise ConfigError(f"init_options rho={self.rho!r} is invalid: it must be >= 1 (1 = no rank redistribution)")
        require_in_range("init_options tau", self.tau, 0.0, 1.0, closed_high=True)
        if self.tau == 0.0:
            raise ConfigError("init_options tau=0 is invalid: it must lie in (0, 1]; PEFT's default is 0.99")
        require_positive("init_options max_batches", self.max_batches, integer=True)
        if isinstance(self.block_cache_mb, bool) or not self.block_cache_mb >= 0:
            raise ConfigError(f"init_options block_cache_mb={self.block_cache_mb!r} is invalid: it must be >= 0 "
                              "(megabytes; 0 turns the block cache off)")

    def to_file_dict(self) -> dict[str, Any]:
        """PEFT's `eva_config` entry of adapter_config.json (its `EvaConfig` fields only)."""
        values = asdict(self)
        return {"eva_config": {key: values[key] for key in PEFT_EVA_FIELDS}}


class IncrementalPCA:
    """Incremental PCA of a stream of (tokens, features) batches: scikit-learn's algorithm as PEFT
    ports it (`peft/utils/incremental_pca.py`, lowrank mode), kept to the same numerics."""

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4):
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed, self.niter = seed, niter
        self.components: torch.Tensor | None = None  # (k, n), rows = principal directions
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # float64 running mean and variance
        self.var: torch.Tensor | None = None
        self.n_seen = 0

    def _update_mean_and_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        n_new = X.shape[0]
        total = self.n_seen + n_new
        last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if self.mean is None else self.mean * self.n_seen
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = X - new_sum / n_new
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_unnormalised = centred.square().sum(dim=0, dtype=torch.float64) - correction / n_new
        if self.var is None:
            return mean, new_unnormalised / total, total
        ratio = self.n_seen / n_new
        unnormalised = self.var * self.n_seen + new_unnormalised + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, unnormalised / total, total

    def _svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # PEFT seeds svd_lowrank's random projection with torch.manual_seed(42); seeding only the
        # generator it draws from, inside fork_rng, gives the same numbers and leaves every RNG as it was.
        if X.is_cuda:
            with torch.cuda.device(X.device), torch.random.fork_rng(devices=[torch.cuda.current_device()]):
                torch.cuda.manual_seed(self.seed)
                _, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(self.seed)
                _, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        Vt = V.mH
        # svd_flip on V: the largest-magnitude entry of every component is positive.
        signs = torch.sign(Vt[torch.arange(Vt.shape[0]), Vt.abs().argmax(dim=1)])
        return S, Vt * signs[:, None]

    def partial_fit(self, X: torch.Tensor) -> None:
        X = X.to(torch.float32).clone()
        mean, var, total = self._update_mean_and_var(X)
        if self.components is None:
            X -= mean
        else:
            batch_mean = X.mean(dim=0)
            X -= batch_mean
            correction = math.sqrt(self.n_seen / total * X.shape[0]) * (self.mean - batch_mean)
            X = torch.vstack((self.singular_values[:, None] * self.components, X, correction[None]))
        S, Vt = self._svd(X)
        k = self.n_components
        self.components, self.singular_values = Vt[:k], S[:k]
        self.explained_variance_ratio = (S**2 / torch.sum(var * total))[:k]
        self.mean, self.var, self.n_seen = mean, var, total


@dataclass
class _LayerPCA:
    """The PCA of one group of layers with identical inputs, and its convergence flags."""

    pca: IncrementalPCA
    tau: float
    converged: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.converged = torch.zeros(self.pca.n_components, dtype=torch.bool)

    def update(self, X: torch.Tensor) -> None:
        if X.shape[0] < self.pca.n_components:
            return  # too few tokens for k components in this batch (as PEFT: skipped)
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.partial_fit(X)
        if previous is not None:
            similarity = torch.nn.functional.cosine_similarity(self.pca.components, previous)
            self.converged = (similarity >= self.tau).cpu()


@dataclass
class EvaResult:
    """What the estimation found: per layer (module path) its rank and A (rank x in), the layer that
    owns each shared PCA, the nominal ranks and caps, the forward passes run, convergence, the PCAs
    and how many block calls the block cache answered."""

    components: dict[str, torch.Tensor]
    ranks: dict[str, int]
    owners: dict[str, str]
    nominal_ranks: dict[str, int]
    caps: dict[str, int]
    batches: int
    converged: bool
    pcas: dict[str, IncrementalPCA]
    skipped_blocks: int = 0  # decoder-block calls answered from the block cache instead of computed


def _cycle(data: Iterable[dict]) -> Iterator[dict]:
    """The batches of `data` over and over (a one-shot iterator is remembered on its first pass)."""
    seen = []
    for batch in data:
        seen.append(batch)
        yield batch
    while seen:
        yield from seen


def _with_first(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _token_mask(batch: dict, options: EvaOptions) -> torch.Tensor | None:
    """(batch, seq) bool mask of the tokens the PCA uses, or None to use every row."""
    reference = next((batch[k] for k in ("attention_mask", "input_ids", "labels") if isinstance(batch.get(k), torch.Tensor)), None)
    if reference is None:
        return None
    mask = batch["attention_mask"].bool() if isinstance(batch.get("attention_mask"), torch.Tensor) else torch.ones_like(reference, dtype=torch.bool)
    if options.use_label_mask and isinstance(batch.get("labels"), torch.Tensor):
        mask = mask & (batch["labels"] != options.label_mask_value)
    return mask


def _select_tokens(x: torch.Tensor, mask: torch.Tensor | None, path: str) -> torch.Tensor:
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x[..., 0].numel() == mask.numel():  # layers that see the tokens flattened
        return x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
    raise ConfigError(
        f"EVA cannot tell which rows of {path}'s input {tuple(x.shape)} belong to which token of the batch "
        f"(mask {tuple(mask.shape)}); leave that layer out of target_modules"
    )


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _redistribute(pcas: dict[str, _LayerPCA], owners: dict[str, str], caps: dict[str, int], budget: int) -> dict[str, int]:
    """rank_l = how many of layer l's first k_l ratios are among the `budget` largest of all layers;
    within a group of identical inputs the owner of the PCA takes the largest rank (as PEFT)."""
    keys, values = [], []
    for path, owner in owners.items():
        ratios = pcas[owner].pca.explained_variance_ratio[: caps[path]]
        keys += [path] * len(ratios)
        values += list(ratios)
    order = torch.stack(values).argsort(descending=True)
    ranks = RankBudget(dict.fromkeys(owners, 0), budget=budget, capacity=caps)  # refuses any overshoot
    for index in order[:budget].tolist():
        ranks.grow(keys[index])
    for path, owner in owners.items():
        small, large = ranks.ranks[owner], ranks.ranks[path]
        if small < large:  # lower first, so the total never passes the budget mid-swap
            ranks.set_rank(path, small)
            ranks.set_rank(owner, large)
    return ranks.rank_pattern()


class _StopForward(Exception):
    pass


def _decoder_blocks(model: nn.Module, paths: list[str]) -> tuple[nn.ModuleList | None, dict[str, int]]:
    """The list of same-class blocks holding most of `paths` (a transformer's decoder layers) and
    {path: index of its block} for the paths inside it; (None, {}) when there is none."""
    best, best_index = None, {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1):
            continue
        prefix = f"{name}." if name else ""
        index = {}
        for path in paths:
            head = path[len(prefix):].split(".", 1)[0] if path.startswith(prefix) else ""
            if head.isdigit():
                index[path] = int(head)
        if len(index) > len(best_index):
            best, best_index = module, index
    return best, best_index


def _tree_map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_tree_map(fn, v) for v in value)
    return value


def _tree_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_tree_bytes(v) for v in value) if isinstance(value, (tuple, list)) else 0


class _ResumingForward:
    """Forward passes over cycled batches that skip the decoder blocks no hooked layer is in.

    Per batch it keeps (within `budget_bytes`) the output of the block just before the first block
    still collecting. When the batch comes round again every block up to the kept one returns that
    output without computing, and the pass stops after the last hooked layer (`_StopForward`). The
    model is frozen and the batch is the same object, so the kept output is exactly what the skipped
    blocks would compute: ranks and components do not change. EVA's late layers converge last: on
    the default model and `bench/init_time.py`'s data this computes 1,409 of the 3,271 block calls
    that passes stopped only after the last collecting layer make.
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], budget_bytes: int):
        self.model, self.layers, self.budget = model, layers, budget_bytes
        self.blocks, self.block_of = _decoder_blocks(model, list(layers)) if budget_bytes > 0 else (None, {})
        self.kept: dict[int, tuple[int, Any, int]] = {}  # id(batch) -> (block index, its output, bytes)
        self.kept_bytes = 0
        self.skipped_blocks = 0
        self.checked = False  # set by `full_pass`
        # No KV cache: nothing reads it, and skipped blocks would leave holes in it.
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def full_pass(self, batch: dict) -> None:
        """A whole forward pass, which also checks that every block runs once per forward: a block
        that runs twice (weights shared across depth) has no single output to keep, so then no block
        is ever skipped. Until this pass has run, none is."""
        calls = [0] * len(self.blocks) if self.blocks is not None else []
        handles = [block.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, block in enumerate(self.blocks or ())]
        try:
            self.model(**{**self.extra, **batch})
        finally:
            for handle in handles:
                handle.remove()
        if max(calls, default=0) > 1:
            self.blocks, self.block_of = None, {}
        self.checked = True

    def __call__(self, key: int, batch: dict, hooked: list[str]) -> None:
        """One pass of `batch` (remembered by `key`) for the `hooked` layers, in firing order."""
        first = min((self.block_of.get(path, -1) for path in hooked), default=-1)
        if not self.checked:
            first = -1
        kept = self.kept.get(key) if self.blocks is not None and first > 0 else None
        resume = kept[0] if kept is not None and kept[0] < first else -1
        patched, handles = [], []

        def stop(module, args, output):
            raise _StopForward

        handles.append(self.layers[hooked[-1]].register_forward_hook(stop))
        if resume >= 0:
            for index in range(resume + 1):
                block = self.blocks[index]
                patched.append((block, block.__dict__.get("forward", _UNSET)))
                block.forward = self._kept_output(kept[1])
        if first > 0 and first - 1 > resume and self.blocks is not None:
            handles.append(self.blocks[first - 1].register_forward_hook(self._keeper(key, first - 1)))
        try:
            self.model(**{**self.extra, **batch})
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for block, forward in patched:
                if forward is _UNSET:
                    del block.forward
                else:
                    block.forward = forward

    def _kept_output(self, output):
        def forward(*args, **kwargs):
            self.skipped_blocks += 1
            return _tree_map(torch.Tensor.clone, output)

        return forward

    def _keeper(self, key: int, index: int):
        def keep(module, args, output):
            size = _tree_bytes(output)
            _, _, old = self.kept.pop(key, (None, None, 0))
            self.kept_bytes -= old
            if self.kept_bytes + size <= self.budget:
                self.kept[key] = (index, _tree_map(lambda t: t.detach().clone(), output), size)
                self.kept_bytes += size

        return keep


_UNSET = object()


@torch.no_grad()
def estimate_eva(model: nn.Module, adapter_name: str, data: Iterable[dict], options: EvaOptions,
                 progress: bool = True) -> EvaResult:
    """Run the base model over `data` (cycled) until every layer's EVA components have converged."""
    layers = {path: layer for path, layer in adapted_layers(model) if adapter_name in layer.adapters}
    if not layers:
        raise ConfigError(f"no layer holds adapter {adapter_name!r}; inject it before running EVA")
    nominal = {path: layer.adapters[adapter_name].r for path, layer in layers.items()}
    caps = {path: min(round(nominal[path] * options.rho), layer.in_features) for path, layer in layers.items()}
    budget = sum(nominal.values())
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    stream = _cycle(data)
    first = next(stream, None)
    if first is None:
        raise ConfigError("EVA got no batches: pass at least one batch, e.g. lorakit.inject(model, config, data=[batch])")
    current: dict[str, Any] = {"mask": None}
    handles: dict[str, Any] = {}

    def hook_for(path: str, sink):
        def hook(module, args, output):
            sink(_select_tokens(args[0], current["mask"], path))

        return hook

    was_training = model.training
    start = time.perf_counter()
    model.eval()
    try:
        with disabled(model):
            # 1. One pass to find layers with identical inputs (q/k/v, gate/up): they share one PCA.
            fingerprints: dict[str, str] = {}

            def fingerprint(path):
                def sink(x):
                    digest = hashlib.sha256(x.detach().float().cpu().contiguous().numpy().tobytes())
                    fingerprints.setdefault(path, f"{tuple(x.shape)}:{digest.hexdigest()}")

                return sink

            for path, layer in layers.items():
                handles[path] = layer.register_forward_hook(hook_for(path, fingerprint(path)))
            batch = _to_device(first, device)
            current["mask"] = _token_mask(batch, options)
            forward = _ResumingForward(model, layers, int(options.block_cache_mb * 2**20))
            forward.full_pass(batch)
            while handles:
                handles.popitem()[1].remove()
            silent = [path for path in layers if path not in fingerprints]
            if silent:
                raise ConfigError(f"EVA: layers {silent[:4]} received no input in a forward pass; leave them out of target_modules")
            groups: dict[str, list[str]] = {}  # fingerprint -> layers (module order); the first owns the PCA
            for path in layers:
                groups.setdefault(fingerprints[path], []).append(path)
            for members in groups.values():
                top = max(caps[m] for m in members)
                caps.update(dict.fromkeys(members, top))
            # {layer: the layer whose PCA it uses}, in PEFT's order (owners in module order, then the
            # other members group by group), which decides ties in the redistribution.
            owners = {members[0]: members[0] for members in groups.values()}
            owners.update({m: members[0] for members in groups.values() for m in members[1:]})
            pcas = {path: _LayerPCA(IncrementalPCA(caps[path]), options.tau) for path in (members[0] for members in groups.values())}
            for path, state in pcas.items():
                handles[path] = layers[path].register_forward_hook(hook_for(path, state.update))
            firing_order = list(fingerprints)  # the order the layers ran in, for stopping the forward early

            # 2. Incremental PCA until every layer's allocated components have converged.
            ranks = dict(caps)
            done = dict.fromkeys(pcas, False)
            batches = 0
            bar = tqdm(_with_first(first, stream), desc="EVA", unit="batch", disable=not progress, leave=False)
            for batch in bar:
                for path, state in pcas.items():
                    converged = bool(state.converged[: ranks[path]].all())
                    if not done[path] and converged:
                        handles.pop(path).remove()
                        done[path] = True
                    elif done[path] and not converged:  # its allocation grew: hooked again
                        handles[path] = layers[path].register_forward_hook(hook_for(path, state.update))
                        done[path] = False
                bar.set_postfix_str(f"{sum(done[o] for o in owners.values())}/{len(owners)} layers converged")
                if all(done.values()) or batches >= options.max_batches:
                    break
                key, batch = id(batch), _to_device(batch, device)
                current["mask"] = _token_mask(batch, options)
                forward(key, batch, [path for path in firing_order if path in handles])
                batches += 1
                if all(state.pca.components is not None for state in pcas.values()):
                    ranks = _redistribute(pcas, owners, caps, budget)
            bar.close()
    finally:
        for handle in handles.values():
            handle.remove()
        model.train(was_training)

    empty = [path for path, state in pcas.items() if state.pca.components is None]
    if empty:
        raise ConfigError(
            f"EVA: layers {empty[:4]} never saw a batch with at least their {caps[empty[0]]} components' worth of "
            "tokens; use more or longer batches, use_label_mask=False, or a lower rho / r"
        )
    unconverged = [path for path, state in pcas.items() if not bool(state.converged[: ranks[path]].all())]
    if unconverged:
        warnings.warn(
            f"EVA: {len(unconverged)} layer(s) (e.g. {unconverged[:3]}) did not converge to tau={options.tau} within "
            f"max_batches={options.max_batches} forward passes; their current components are used. Pass more "
            "batches, raise max_batches or lower tau",
            stacklevel=3,
        )
    components = {}
    for path, owner in owners.items():
        pca = pcas[owner].pca
        A = pca.components[: ranks[path]]
        if options.whiten:
            A = A / pca.singular_values[: ranks[path]].sqrt()[:, None]
        components[path] = A
    seconds = time.perf_counter() - start
    if progress:
        shown = sorted(ranks.values())
        print(f"EVA: {len(layers)} layers, {batches} batches, ranks {shown[0]}..{shown[-1]} "
              f"(budget {budget}), {forward.skipped_blocks} block calls skipped, {seconds:.1f}s", flush=True)
    return EvaResult(components, ranks, owners, nominal, caps, batches, not unconverged,
                     {path: state.pca for path, state in pcas.items()}, forward.skipped_blocks)


def apply_eva(model: nn.Module, adapter_name: str, result: EvaResult, options: EvaOptions) -> None:
    """Give every layer an adapter of its EVA rank with A = its components and B = 0, remove the
    adapters of rank-0 layers, and record the ranks and alphas in the config's patterns (as PEFT)."""
    config = adapter_configs(model)[adapter_name]
    layers = {path: layer for path, layer in adapted_layers(model) if adapter_name in layer.adapters}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, layer in layers.items():
        adapter = layer.adapters[adapter_name]
        rank, alpha = result.ranks[path], adapter.alpha
        if rank == 0:
            continue
        if rank != adapter.r and options.adjust_scaling_factors:
            alpha = alpha * rank / adapter.r
        if rank != config.r:
            rank_pattern[path] = rank
        if alpha != config.alpha:
            alpha_pattern[path] = alpha
    new_config = copy.deepcopy(config)
    new_config.rank_pattern, new_config.alpha_pattern = rank_pattern, alpha_pattern
    kept = [path for path in layers if result.ranks[path] > 0]
    if len(kept) < len(layers):
        new_config.target_modules = kept
    new_config.validate()
    object.__setattr__(model, CONFIGS_ATTR, {**adapter_configs(model), adapter_name: new_config})

    for path, layer in layers.items():
        old = layer.adapters[adapter_name]
        active = layer.active
        layer.remove_adapter(adapter_name)
        if result.ranks[path] == 0:
            if not layer.adapters:
                _replace_module(model, path, layer.base)
            continue
        new = type(old)(new_config, layer.in_features, layer.out_features, path)
        new.to(device=old.lora_A.weight.device, dtype=old.lora_A.weight.dtype)
        new.train(old.training)
        new.lora_A.weight.copy_(result.components[path].to(new.lora_A.weight))
        new.lora_B.weight.zero_()
        layer.add_adapter(adapter_name, new)
        layer.active = active


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


@register_data_initialiser("eva", options=EvaOptions)
@torch.no_grad()
def eva_init(model: nn.Module, adapter_name: str, data: Iterable[dict], options: EvaOptions | None,
             progress: bool = True) -> None:
    """`init="eva"`: estimate each layer's components over `data`, then rebuild its adapter."""
    options = options or EvaOptions()
    config = adapter_configs(model)[adapter_name]
    if config.method != "lora":
        raise ConfigError(f"init='eva' initialises LoRA adapters (method='lora'), not {config.method!r}")
    apply_eva(model, adapter_name, estimate_eva(model, adapter_name, data, options, progress), options)


__all__ = ["EvaOptions", "EvaResult", "IncrementalPCA", "apply_eva", "estimate_eva", "eva_init"]
