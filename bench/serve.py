"""Serving many LoRA adapters: lorakit's engine against PEFT and the no-adapter ceiling, one run.

S-LoRA's synthetic workload (Sheng et al., arXiv 2311.03285; official `benchmarks/trace.py`), scaled
down to the default model (SmolLM2-135M-Instruct). For each number of adapters n, the same seeded
request list goes to every system:

- request i arrives at the running sum of Gamma(shape 1/cv^2, scale cv^2/rate) intervals (cv = 1 is
  a Poisson process of `rate` requests/s); its adapter is floor(n * u), u ~ numpy `power(alpha)`
  (alpha < 1 skews traffic towards the first adapters, alpha = 1 is uniform); its prompt and output
  lengths are uniform integers in [lo, hi) (numpy `randint`, drawn in S-LoRA's order);
- prompts are real text: GSM8K test questions (`../shared/data/gsm8k`, read-only), tokenised,
  joined one after another from question i on and truncated to the drawn length;
- the adapters are random PEFT-format LoRA folders written into a temporary directory for this run
  (removed at the end): rank 8 or 16, targets q,v or all seven linear layers of each block, alpha =
  2 r, B non-zero with ||s B A||_F about `delta_scale` x ||W||_F per module, so outputs differ from
  the base model but stay fluent.

Systems (all greedy, every request generates exactly its max_tokens: EOS does not stop anyone):

- lorakit:       `lorakit.serve.Engine` (continuous batching, per-row LoRA, adapters paged from disk
                 through an `AdapterStore`); each request is submitted at its arrival time;
- peft-mixed:    a PeftModel holding all n adapters; static batches of the requests that have
                 arrived (up to the max batch size), left-padded, `generate(..., adapter_names=[...])`;
                 the time to load the n adapters is reported apart and excluded from throughput;
- merge-swap:    one request at a time: set_adapter, merge it into the weights, generate, unmerge;
- one-at-a-time: PEFT set_adapter and generate, batch 1 (its outputs are the reference every other
                 system's outputs are compared with, token for token);
- base-engine:   the base model with no adapters through the same engine (the ceiling);
- base-hf:       the base model with no adapters, HF generate in the same static batches as peft-mixed.

Throughput = generated tokens (or requests) / (last completion - first arrival); latency = completion
- arrival, mean and p90 over the requests. Throughput is capped by the offered load (`rate`), so the
default rates are well above what the systems sustain, to measure capacity. The full run also checks
that 1,000 registered adapters are served with the store's host memory (`stats["host_bytes"]`, sampled
every few ms while serving) within its budget.

    .venv/bin/python bench/serve.py --quick    # n in 1, 8, 64; < 10 min on 2 CPU cores
    .venv/bin/python bench/serve.py            # n in 1, 8, 64, 512 + the 1,000-adapter memory check (GPU)

Writes bench/results/serve_<device>[_quick].md (command, environment, table) and a .png (throughput
against the number of adapters, one line per system).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as step_bench  # noqa: E402  (environment description)

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k"  # ../shared/data, read-only
MIB = 2**20

SYSTEMS = {
    "lorakit": "lorakit engine",
    "peft-mixed": "PEFT mixed-adapter batches",
    "merge-swap": "merge + swap per request (PEFT)",
    "one-at-a-time": "one at a time (PEFT, batch 1)",
    "base-engine": "no adapters, lorakit engine (ceiling)",
    "base-hf": "no adapters, HF generate batches",
}
PEFT_SYSTEMS = ("peft-mixed", "merge-swap", "one-at-a-time")
REFERENCE = "one-at-a-time"
TARGET_SETS = {
    "q,v": ("q_proj", "v_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# Targets of the issue, checked at this number of adapters.
TARGET_N = 64
TARGET_VS_PEFT = 3.0
TARGET_VS_CEILING = 0.7


@dataclass
class Settings:
    """What one run does (all of it is written to the results file)."""

    adapter_counts: tuple[int, ...] = (1, 8, 64, 512)
    requests: int = 128  # per number of adapters
    rate: float = 100.0  # offered requests per second (above capacity: throughput measures the system)
    cv: float = 1.0  # coefficient of variation of the arrival intervals (1: Poisson)
    alpha: float = 0.8  # power-law skew of adapter popularity (S-LoRA's H100 suite; 1 = uniform)
    prompt_range: tuple[int, int] = (8, 128)  # [lo, hi) tokens
    output_range: tuple[int, int] = (8, 64)  # [lo, hi) tokens
    max_batch_size: int = 16
    max_adapters_per_step: int | None = None  # engine's limit (None: the engine's default)
    mode: str = "segment"  # engine's batched-LoRA evaluation
    ranks: tuple[int, ...] = (8, 16)
    delta_scale: float = 0.05  # ||s B A||_F / ||W||_F per module
    host_budget_mib: float = 2048.0  # the engine's AdapterStore budget in the throughput runs
    registered: int = 1000  # adapters registered for the host-memory check (0: skip it)
    check_budget_mib: float = 256.0  # the store's host budget in that check
    check_requests: int = 128
    warmup: int = 2  # requests each system runs untimed before its timed run
    systems: tuple[str, ...] = tuple(SYSTEMS)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def validate(self) -> None:
        for name in ("requests", "max_batch_size", "check_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.adapter_counts or min(self.adapter_counts) < 1:
            raise ValueError(f"adapter_counts={self.adapter_counts} must be positive integers")
        for name in ("prompt_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo < hi:
                raise ValueError(f"{name}={getattr(self, name)} must be [lo, hi) with 1 <= lo < hi")
        if self.rate <= 0 or self.cv <= 0 or self.alpha <= 0:
            raise ValueError(f"rate={self.rate}, cv={self.cv}, alpha={self.alpha} must all be > 0")
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise ValueError(f"systems={self.systems}: unknown {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.registered < 0 or self.warmup < 0:
            raise ValueError("registered and warmup must be >= 0")

    @property
    def total_adapters(self) -> int:
        return max(max(self.adapter_counts), self.registered)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The check over many adapters shrinks with the rest in the quick run: 64 registered adapters (the
# ones the throughput runs use, 590 MiB of files) under a 64 MiB budget (the largest holds 19 MiB).
QUICK = dict(adapter_counts=(1, 8, 64), requests=32, rate=50.0, prompt_range=(8, 48), output_range=(8, 17),
             registered=64, check_budget_mib=64.0, check_requests=32)


# --- adapters --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    targets: str  # a key of TARGET_SETS


def adapter_specs(count: int, settings: Settings) -> list[AdapterSpec]:
    """Adapter i's rank and targets, drawn from a seeded generator (the same for every run)."""
    rng = np.random.RandomState(settings.seed + 1)
    ranks = rng.choice(np.array(settings.ranks), size=count)
    kinds = rng.randint(0, len(TARGET_SETS), size=count)
    names = list(TARGET_SETS)
    return [AdapterSpec(f"a{i:04d}", int(ranks[i]), names[int(kinds[i])]) for i in range(count)]


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Module path -> Linear for every projection an adapter may target (the output head excluded)."""
    wanted = set(TARGET_SETS["all-linear"])
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted}


def write_adapters(model: nn.Module, root: Path, specs: list[AdapterSpec], settings: Settings) -> int:
    """One PEFT LoRA folder per spec under `root` (adapter_config.json written by peft.LoraConfig,
    tensors under PEFT's keys); returns the bytes written. A ~ N(0, 1/in), B ~ N(0, sd^2) with sd
    chosen so that E||s B A||_F = delta_scale ||W||_F (E||B A||_F^2 = out r sd^2 when A's variance is 1/in)."""
    import peft
    from safetensors.torch import save_file

    linears = target_linears(model)
    norms = {name: float(module.weight.detach().float().norm()) for name, module in linears.items()}
    base_name = getattr(model.config, "_name_or_path", None) or None
    total = 0
    for index, spec in enumerate(specs):
        folder = root / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + index)
        scale = 2.0  # alpha = 2 r
        wanted = set(TARGET_SETS[spec.targets])
        tensors = {}
        for path, module in linears.items():
            if path.rsplit(".", 1)[-1] not in wanted:
                continue
            out_features, in_features = module.weight.shape
            a = torch.randn(spec.rank, in_features, generator=generator) / math.sqrt(in_features)
            sd = settings.delta_scale * norms[path] / (scale * math.sqrt(out_features * spec.rank))
            b = torch.randn(out_features, spec.rank, generator=generator) * sd
            tensors[f"base_model.model.{path}.lora_A.weight"] = a
            tensors[f"base_model.model.{path}.lora_B.weight"] = b
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft.LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, target_modules=list(TARGET_SETS[spec.targets]),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name).save_pretrained(str(folder))
        total += sum(f.stat().st_size for f in folder.iterdir())
    return total


# --- workload ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    adapter: int  # index into the adapter list
    prompt: tuple[int, ...]
    max_tokens: int


def question_tokens(tokenizer, path: Path, limit: int = 400) -> list[list[int]]:
    """Token ids of the first `limit` GSM8K questions, each followed by a newline."""
    with path.open() as handle:
        questions = [json.loads(line)["question"] for _, line in zip(range(limit), handle)]
    return [tokenizer(q.strip() + "\n", add_special_tokens=False)["input_ids"] for q in questions]


def make_workload(n_adapters: int, settings: Settings, questions: list[list[int]],
                  count: int | None = None) -> list[Request]:
    """S-LoRA's `generate_requests` (same draws, same order), with real prompts. For one seed, only
    the adapter indices depend on n: lengths, arrivals and prompts are the same for every n."""
    count = count or settings.requests
    rng = np.random.RandomState(settings.seed)
    u = rng.power(settings.alpha, count)
    adapters = np.minimum((u * n_adapters).astype(int), n_adapters - 1)
    prompt_lens = rng.randint(*settings.prompt_range, count)
    output_lens = rng.randint(*settings.output_range, count)
    intervals = rng.gamma(1.0 / settings.cv**2, settings.cv**2 / settings.rate, count)
    arrivals = np.cumsum(intervals)
    requests = []
    for i in range(count):
        ids: list[int] = []
        j = i
        while len(ids) < prompt_lens[i]:
            ids += questions[j % len(questions)]
            j += 1
        requests.append(Request(i, float(arrivals[i]), int(adapters[i]), tuple(ids[:prompt_lens[i]]),
                                int(output_lens[i])))
    return requests


# --- one system's run ---------------------------------------------------------------------------------
@dataclass
class SystemRun:
    system: str
    n_adapters: int
    arrivals_s: list[float]
    finishes_s: list[float]
    outputs: list[list[int]]  # generated token ids per request
    setup_s: float = 0.0  # excluded from throughput (PEFT: loading the n adapters)
    stats: dict = field(default_factory=dict)
    matches: tuple[int, int] | None = None  # (outputs equal to the reference, compared)
    first_mismatch: str = ""

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def span_s(self) -> float:
        return max(self.finishes_s) - min(self.arrivals_s)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.span_s

    @property
    def requests_per_s(self) -> float:
        return len(self.outputs) / self.span_s

    @property
    def latencies_s(self) -> list[float]:
        return [f - a for a, f in zip(self.arrivals_s, self.finishes_s)]

    @property
    def mean_latency_s(self) -> float:
        return statistics.fmean(self.latencies_s)

    @property
    def p90_latency_s(self) -> float:
        return float(np.percentile(self.latencies_s, 90))


def _collect(system: str, n: int, requests: list[Request], finish: dict[int, float],
             outputs: dict[int, list[int]], **extra) -> SystemRun:
    ordered = sorted(requests, key=lambda r: r.index)
    return SystemRun(system, n, [r.arrival_s for r in ordered], [finish[r.index] for r in ordered],
                     [outputs[r.index] for r in ordered], **extra)


def run_static(requests: list[Request], batch_size: int,
               run_batch: Callable[[list[Request]], list[list[int]]]) -> tuple[dict, dict]:
    """Drive a static-batching system: whenever it is free, it takes the requests that have arrived
    (up to `batch_size`, in arrival order), or waits for the next arrival. (finish times, outputs)."""
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    finish, outputs = {}, {}
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival_s > now:
            time.sleep(pending[0].arrival_s - now)
            continue
        batch = []
        while pending and len(batch) < batch_size and pending[0].arrival_s <= now:
            batch.append(pending.popleft())
        results = run_batch(batch)
        done = time.perf_counter() - start
        for request, tokens in zip(batch, results):
            finish[request.index], outputs[request.index] = done, tokens
    return finish, outputs


def run_engine(engine, requests: list[Request], adapter_of: Callable[[Request], str | None]) -> tuple[dict, dict]:
    """Submit each request at its arrival time (this thread is the driver); completion times are the
    engine's own `finished_at` stamps, so waiting on results in order adds nothing."""
    from lorakit.serve.engine import SamplingParams

    handles = []
    start = time.perf_counter()
    for request in sorted(requests, key=lambda r: r.arrival_s):
        delay = request.arrival_s - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0, ignore_eos=True)
        handles.append((request, engine.submit(list(request.prompt), adapter=adapter_of(request), params=params)))
    finish, outputs = {}, {}
    for request, handle in handles:
        completion = handle.result(timeout=3600)
        if completion.finish_reason != "length":
            raise RuntimeError(f"request {request.index} finished with {completion.finish_reason!r}, not 'length'")
        finish[request.index], outputs[request.index] = handle.finished_at - start, completion.token_ids
    return finish, outputs


def hf_generate(model: nn.Module, batch: list[Request], pad_id: int, device: torch.device, **kwargs) -> list[list[int]]:
    """Greedy HF generate on a left-padded batch, to the longest max_tokens of the batch with EOS
    stopping off (eos_token_id=None: the argmax is untouched, unlike min_new_tokens); each row keeps
    its own max_tokens."""
    width = max(len(r.prompt) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, width - len(request.prompt):] = torch.tensor(request.prompt)
        mask[row, width - len(request.prompt):] = 1
    new = max(r.max_tokens for r in batch)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=pad_id, **kwargs)
    generated = out[:, width:].cpu()
    if generated.shape[1] != new:
        raise RuntimeError(f"generate stopped after {generated.shape[1]} of {new} tokens")
    return [generated[row, :request.max_tokens].tolist() for row, request in enumerate(batch)]


class PeftBaselines:
    """One PeftModel over its own copy of the base, holding the first n adapters (loaded as n grows)."""

    def __init__(self, base: nn.Module, root: Path, pad_id: int):
        self.base, self.root, self.pad_id = base, root, pad_id
        self.device = next(base.parameters()).device
        self.model = None
        self.loaded: list[str] = []
        self.load_s = 0.0
        self._snapshot: dict[str, torch.Tensor] = {}

    def ensure(self, names: list[str]) -> float:
        """Load the adapters not loaded yet; returns the total seconds spent loading the ones held."""
        from peft import PeftModel

        for name in names:
            if name in self.loaded:
                continue
            start = time.perf_counter()
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(self.root / name), adapter_name=name)
            else:
                self.model.load_adapter(str(self.root / name), adapter_name=name)
            self.load_s += time.perf_counter() - start
            self.loaded.append(name)
        self.model.eval()
        return self.load_s

    def mixed(self, batch: list[Request], names: list[str]) -> list[list[int]]:
        return hf_generate(self.model, batch, self.pad_id, self.device,
                           adapter_names=[names[r.adapter] for r in batch])

    def single(self, batch: list[Request], names: list[str]) -> list[list[int]]:
        self.model.set_adapter(names[batch[0].adapter])
        return hf_generate(self.model, batch, self.pad_id, self.device)

    def merge_swap(self, batch: list[Request], names: list[str]) -> list[list[int]]:
        # set_adapter first: a module the merged adapter does not target stays unmerged and would
        # otherwise apply whichever adapter was active
        self.model.set_adapter(names[batch[0].adapter])
        self.model.base_model.merge_adapter()
        try:
            return hf_generate(self.model, batch, self.pad_id, self.device)
        finally:
            self.model.base_model.unmerge_adapter()

    def snapshot(self) -> None:
        """Keep the base weights, so merge/unmerge rounding cannot drift into later runs."""
        from peft.tuners.lora import LoraLayer

        self._snapshot = {name: module.get_base_layer().weight.detach().clone()
                          for name, module in self.model.named_modules() if isinstance(module, LoraLayer)}

    def restore(self) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, weight in self._snapshot.items():
                modules[name].get_base_layer().weight.copy_(weight)
        self._snapshot = {}


# --- the benchmark -----------------------------------------------------------------------------------
@dataclass
class BenchResult:
    settings: Settings
    model_name: str
    runs: list[SystemRun]
    adapter_bytes: int
    adapter_kinds: dict[str, int]
    distinct: dict[int, int]  # n -> adapters the workload actually uses
    memory_check: dict | None = None
    notes: list[str] = field(default_factory=list)

    def run(self, system: str, n: int) -> SystemRun | None:
        return next((r for r in self.runs if r.system == system and r.n_adapters == n), None)

    def ceiling(self, n: int) -> SystemRun | None:
        return self.run("base-engine", n) or self.run("base-hf", n)

    def ratio(self, system: str, n: int, to: str) -> float | None:
        run = self.run(system, n)
        other = self.ceiling(n) if to == "ceiling" else self.run(to, n)
        if run is None or other is None:
            return None
        return run.tokens_per_s / other.tokens_per_s


def _warm(requests: list[Request], settings: Settings) -> list[Request]:
    """The first requests of the list, arriving at once: untimed warm-up."""
    return [replace(r, arrival_s=0.0) for r in requests[:settings.warmup]]


def _compare(run: SystemRun, reference: SystemRun) -> None:
    equal = [a == b for a, b in zip(run.outputs, reference.outputs)]
    run.matches = (sum(equal), len(equal))
    for i, ok in enumerate(equal):
        if not ok:
            got, want = run.outputs[i], reference.outputs[i]
            at = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            run.first_mismatch = f"request {i}: first differing token at position {at} of {len(want)}"
            break


def measure(model: nn.Module, tokenizer, settings: Settings, root: Path, questions: list[list[int]],
            log: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Write the adapters into `root`, then run every selected system for every n on the same requests."""
    settings.validate()
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    model = model.to(device=device, dtype=dtype).eval()
    specs = adapter_specs(settings.total_adapters, settings)
    names = [s.name for s in specs]
    start = time.perf_counter()
    adapter_bytes = write_adapters(model, root, specs, settings)
    log(f"  wrote {len(specs)} adapters ({adapter_bytes / MIB:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    kinds: dict[str, int] = {}
    for spec in specs[:max(settings.adapter_counts)]:
        key = f"r={spec.rank} {spec.targets}"
        kinds[key] = kinds.get(key, 0) + 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    wanted = set(settings.systems)
    peft_runs = PeftBaselines(copy.deepcopy(model), root, pad_id) if wanted & set(PEFT_SYSTEMS) else None
    result = BenchResult(settings, f"{getattr(model.config, '_name_or_path', '') or 'random init'} "
                                   f"({type(model).__name__})", [], adapter_bytes, kinds, {})
    for n in sorted(settings.adapter_counts):
        requests = make_workload(n, settings, questions)
        warm = _warm(requests, settings)
        result.distinct[n] = len({r.adapter for r in requests})
        log(f"n = {n} adapters ({result.distinct[n]} used by {len(requests)} requests)")
        runs: dict[str, SystemRun] = {}

        def record(run: SystemRun) -> None:
            runs[run.system] = run
            result.runs.append(run)
            log(f"  {run.system:14s} {run.tokens_per_s:8.1f} tokens/s  {run.requests_per_s:6.2f} req/s  "
                f"latency mean {run.mean_latency_s:6.2f} s  p90 {run.p90_latency_s:6.2f} s")

        if peft_runs is not None:
            load_s = peft_runs.ensure(names[:n])
            log(f"  PEFT holds {n} adapters (loading took {load_s:.1f} s, excluded from throughput)")
            static = {"one-at-a-time": (1, peft_runs.single), "peft-mixed": (settings.max_batch_size, peft_runs.mixed),
                      "merge-swap": (1, peft_runs.merge_swap)}
            for system in ("one-at-a-time", "peft-mixed", "merge-swap"):  # merge-swap last: it rewrites W
                if system not in wanted:
                    continue
                size, call = static[system]
                if system == "merge-swap":
                    peft_runs.snapshot()
                try:
                    run_static(warm, size, lambda batch: call(batch, names))
                    finish, outputs = run_static(requests, size, lambda batch: call(batch, names))
                finally:
                    if system == "merge-swap":
                        peft_runs.restore()
                record(_collect(system, n, requests, finish, outputs, setup_s=load_s))
        if "base-hf" in wanted:
            run_static(warm, settings.max_batch_size, lambda batch: hf_generate(model, batch, pad_id, device))
            finish, outputs = run_static(requests, settings.max_batch_size,
                                         lambda batch: hf_generate(model, batch, pad_id, device))
            record(_collect("base-hf", n, requests, finish, outputs))
        if wanted & {"lorakit", "base-engine"}:
            for run in engine_runs(model, tokenizer, root, names[:n], requests, warm, settings):
                record(run)
        if REFERENCE in runs:
            for run in runs.values():
                if run.system != REFERENCE and not run.system.startswith("base"):
                    _compare(run, runs[REFERENCE])
    if settings.registered and "lorakit" in wanted:
        result.memory_check = memory_check(model, tokenizer, root, names[:settings.registered], settings,
                                           questions, log)
    return result


def _engine(model: nn.Module, tokenizer, store, settings: Settings, queue: int):
    from lorakit.serve.engine import Engine

    options = dict(max_batch_size=settings.max_batch_size, max_queue=max(256, queue), mode=settings.mode)
    if settings.max_adapters_per_step is not None:
        options["max_adapters_per_step"] = settings.max_adapters_per_step
    return Engine(model, tokenizer, store, **options).start()


def engine_runs(model: nn.Module, tokenizer, root: Path, names: list[str], requests: list[Request],
                warm: list[Request], settings: Settings) -> list[SystemRun]:
    """The lorakit engine, then the same engine with no adapters (the ceiling), on a fresh copy of
    the base and a fresh store (no adapter cached by an earlier n)."""
    from lorakit.serve.store import AdapterStore

    store = AdapterStore(root, host_budget_bytes=int(settings.host_budget_mib * MIB), base_model=model)
    engine = _engine(copy.deepcopy(model), tokenizer, store, settings, len(requests))
    runs = []
    try:
        n = len(names)
        for system, adapter_of in (("lorakit", lambda r: names[r.adapter]), ("base-engine", lambda r: None)):
            if system not in settings.systems:
                continue
            run_engine(engine, warm, adapter_of)
            before = engine.metrics() | {"device_loads": engine.counters["device_loads"]}
            finish, outputs = run_engine(engine, requests, adapter_of)
            after = engine.metrics() | {"device_loads": engine.counters["device_loads"]}
            stats = {key: after[key] - before[key] for key in ("adapter_loads", "adapter_evictions", "device_loads",
                                                               "device_adapter_evictions")}
            runs.append(_collect(system, n, requests, finish, outputs, stats=stats))
    finally:
        engine.shutdown(graceful=False, timeout=5.0)
    return runs


def memory_check(model: nn.Module, tokenizer, root: Path, names: list[str], settings: Settings,
                 questions: list[list[int]], log: Callable[[str], None]) -> dict:
    """Register every adapter, serve requests spread over all of them (same power law) with a host
    budget far below their total size, and sample the store's host bytes while serving."""
    from lorakit.serve.store import AdapterStore

    budget = int(settings.check_budget_mib * MIB)
    # no root: every adapter is registered explicitly (vLLM's load_lora_adapter), validated as it comes
    store = AdapterStore(None, host_budget_bytes=budget, base_model=model, allow_any_path=True)
    start = time.perf_counter()
    for name in names:
        store.register(name, root / name)
    register_s = time.perf_counter() - start
    requests = make_workload(len(names), settings, questions, count=settings.check_requests)
    engine = _engine(copy.deepcopy(model), tokenizer, store, settings, len(requests))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(int(store.stats["host_bytes"]))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        finish, outputs = run_engine(engine, requests, lambda r: names[r.adapter])
    finally:
        stop.set()
        sampler.join()
        engine.shutdown(graceful=False, timeout=5.0)
    samples.append(int(store.stats["host_bytes"]))
    run = _collect("lorakit", len(names), requests, finish, outputs)
    disk = sum(f.stat().st_size for name in names for f in (root / name).glob("*.safetensors"))
    stats = store.stats
    check = {
        "registered": int(stats.get("registered", len(names))), "budget_bytes": budget,
        "max_host_bytes": max(samples), "samples": len(samples), "adapter_file_bytes": disk,
        "distinct_requested": len({r.adapter for r in requests}), "requests": len(requests),
        "tokens_per_s": run.tokens_per_s, "register_s": register_s,
        **{key: int(stats.get(key, 0)) for key in ("loads", "evictions", "hits", "misses")},
    }
    check["passed"] = check["max_host_bytes"] <= budget
    log(f"host-memory check: {check['registered']} registered, {check['distinct_requested']} requested, "
        f"max host bytes {check['max_host_bytes'] / MIB:.1f} MiB <= budget {budget / MIB:.1f} MiB: "
        f"{'yes' if check['passed'] else 'NO'} ({check['loads']} loads, {check['evictions']} evictions)")
    return check


# --- reporting --------------------------------------------------------------------------------------
HEADER = ["system", "adapters", "tokens/s", "req/s", "mean latency (s)", "p90 latency (s)", "vs PEFT mixed",
          "vs ceiling", "= PEFT single"]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def rows(result: BenchResult) -> list[list[str]]:
    out = []
    for n in sorted(result.settings.adapter_counts):
        for system in SYSTEMS:
            run = result.run(system, n)
            if run is None:
                continue
            match = "reference" if system == REFERENCE else (
                f"{run.matches[0]}/{run.matches[1]}" if run.matches else "")
            out.append([SYSTEMS[system], str(n), f"{run.tokens_per_s:.1f}", f"{run.requests_per_s:.2f}",
                        f"{run.mean_latency_s:.2f}", f"{run.p90_latency_s:.2f}",
                        _ratio(result.ratio(system, n, "peft-mixed")), _ratio(result.ratio(system, n, "ceiling")),
                        match])
    return out


def targets(result: BenchResult) -> list[str]:
    n = TARGET_N
    lines = []
    vs_peft, vs_ceiling = result.ratio("lorakit", n, "peft-mixed"), result.ratio("lorakit", n, "ceiling")
    if vs_peft is not None:
        lines.append(f"- lorakit / PEFT mixed batches at {n} adapters: **{vs_peft:.2f}x** (target >= "
                     f"{TARGET_VS_PEFT:g}x: {'met' if vs_peft >= TARGET_VS_PEFT else 'NOT met'})")
    if vs_ceiling is not None:
        lines.append(f"- lorakit / no-adapter ceiling at {n} adapters: **{vs_ceiling:.2f}x** (target >= "
                     f"{TARGET_VS_CEILING:g}x: {'met' if vs_ceiling >= TARGET_VS_CEILING else 'NOT met'})")
    check = result.memory_check
    if check:
        lines.append(f"- {check['registered']:,} registered adapters ({check['adapter_file_bytes'] / MIB:,.0f} MiB of "
                     f"adapter files), {check['requests']} requests over {check['distinct_requested']} of them: the "
                     f"store's host bytes peaked at **{check['max_host_bytes'] / MIB:.1f} MiB** against a budget of "
                     f"{check['budget_bytes'] / MIB:.1f} MiB ({'within' if check['passed'] else 'OVER'} the budget; "
                     f"{check['samples']} samples while serving; {check['loads']} loads from disk, "
                     f"{check['evictions']} evictions, {check['hits']} hits; registering took "
                     f"{check['register_s']:.1f} s; {check['tokens_per_s']:.1f} tokens/s)")
    return lines


def describe(result: BenchResult) -> str:
    s = result.settings
    kinds = ", ".join(f"{v} x {k}" for k, v in sorted(result.adapter_kinds.items()))
    used = ", ".join(f"{n}: {d}" for n, d in sorted(result.distinct.items()))
    return (f"{result.model_name}, {s.dtype}. Per n: {s.requests} requests (seed {s.seed}), Gamma arrivals at "
            f"{s.rate:g} req/s offered (cv {s.cv:g}), adapter = floor(n u), u ~ power({s.alpha:g}) (adapters "
            f"used per n: {used}); prompt lengths in [{s.prompt_range[0]}, {s.prompt_range[1]}) tokens of GSM8K "
            f"test questions, outputs in [{s.output_range[0]}, {s.output_range[1]}) tokens, greedy, EOS ignored. "
            f"Max batch {s.max_batch_size} for the engine and the static batches; engine mode {s.mode}"
            + (f", max {s.max_adapters_per_step} adapters per step" if s.max_adapters_per_step else "")
            + f", store host budget {s.host_budget_mib:g} MiB. Adapters (largest n): {kinds}; alpha = 2 r, "
              f"||s B A|| = {s.delta_scale:g} ||W|| per module; {result.adapter_bytes / MIB:,.0f} MiB written "
              f"for {s.total_adapters} adapters. {s.warmup} untimed warm-up request(s) per system before each "
              f"timed run")


def format_markdown(result: BenchResult, env: dict[str, str], command: str, png_name: str) -> str:
    lines = [
        *step_bench.results_head(
            "# Serving many LoRA adapters: lorakit engine vs PEFT (S-LoRA's workload, scaled down)", command),
        describe(result) + ".",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *["| " + " | ".join(row) + " |" for row in rows(result)],
        "",
        f"![throughput against the number of adapters]({png_name})",
        "",
        "Throughput = generated tokens (requests) / (last completion - first arrival); latency = completion - "
        "arrival. Ratios are tokens/s; the ceiling is the no-adapter engine run of the same n (HF generate when "
        "the engine did not run). '= PEFT single': requests whose generated tokens equal the one-at-a-time PEFT "
        "run's, token for token (fp32 batching with padding can flip a near-tie argmax).",
        "",
        *targets(result),
        "",
    ]
    details = []
    for run in result.runs:
        bits = []
        if run.setup_s and run.system in PEFT_SYSTEMS and run.system == next(
                s for s in PEFT_SYSTEMS if result.run(s, run.n_adapters)):
            bits.append(f"PEFT loading {run.n_adapters} adapters took {run.setup_s:.1f} s (excluded)")
        if run.stats:
            bits.append(", ".join(f"{k} {v}" for k, v in run.stats.items()))
        if run.first_mismatch:
            bits.append(f"first mismatch with PEFT single: {run.first_mismatch}")
        if bits:
            details.append(f"- {run.system}, n = {run.n_adapters}: " + "; ".join(bits))
    if details:
        lines += ["Details:", "", *details, ""]
    if result.notes:
        lines += [*[f"- {note}" for note in result.notes], ""]
    return "\n".join(lines)


def plot(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for system, label in SYSTEMS.items():
        points = sorted((r.n_adapters, r.tokens_per_s) for r in result.runs if r.system == system)
        if points:
            ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=label,
                    linewidth=2.2 if system == "lorakit" else 1.2,
                    linestyle="--" if system.startswith("base") else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(result.settings.adapter_counts), [str(n) for n in sorted(result.settings.adapter_counts)])
    ax.set_xlabel("number of adapters")
    ax.set_ylabel("throughput (generated tokens/s)")
    ax.set_title(f"{result.settings.requests} requests per point, {result.settings.device}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------------
def _pair(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (< 10 min on 2 CPU cores): " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
                        + " (explicit options win)")
    parser.add_argument("--adapters", default=None, help=f"comma-separated numbers of adapters [{','.join(map(str, d.adapter_counts))}]")
    parser.add_argument("--requests", type=int, default=None, help=f"requests per number of adapters [{d.requests}]")
    parser.add_argument("--rate", type=float, default=None, help=f"offered requests/s [{d.rate:g}]")
    parser.add_argument("--cv", type=float, default=None, help=f"arrival-interval coefficient of variation [{d.cv:g}]")
    parser.add_argument("--alpha", type=float, default=None, help=f"power-law skew of adapter choice [{d.alpha:g}]")
    parser.add_argument("--prompt-len", type=_pair, default=None, help=f"lo,hi prompt tokens [{d.prompt_range}]")
    parser.add_argument("--output-len", type=_pair, default=None, help=f"lo,hi generated tokens [{d.output_range}]")
    parser.add_argument("--max-batch-size", type=int, default=None, help=f"[{d.max_batch_size}]")
    parser.add_argument("--max-adapters-per-step", type=int, default=None, help="engine option [engine default]")
    parser.add_argument("--mode", default=None, choices=("segment", "bmm"), help=f"engine's LoRA evaluation [{d.mode}]")
    parser.add_argument("--systems", default=None, help=f"comma-separated subset of {','.join(SYSTEMS)} [all]")
    parser.add_argument("--registered", type=int, default=None,
                        help=f"adapters registered in the host-memory check, 0 skips it [{d.registered}]")
    parser.add_argument("--check-budget-mib", type=float, default=None, help=f"store budget in that check [{d.check_budget_mib:g}]")
    parser.add_argument("--host-budget-mib", type=float, default=None, help=f"store budget in the throughput runs [{d.host_budget_mib:g}]")
    parser.add_argument("--seed", type=int, default=None, help=f"[{d.seed}]")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda'")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help=f"[{d.dtype}]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--model", default=None, help="base model for lorakit.models.load [the default model]")
    parser.add_argument("--random-init-from", type=Path, default=None, metavar="DIR",
                        help="instead of --model: a random-init model from DIR/config.json, with the tokenizer files in "
                             "DIR (same compute as the real model, for machines without it; see bench/gpu_check.sh)")
    parser.add_argument("--gsm8k", type=Path, default=GSM8K, metavar="DIR",
                        help=f"folder holding GSM8K's test.jsonl, the prompts' text [{GSM8K}]")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/serve_<device>[_quick].md)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    chosen = dict(QUICK) if args.quick else {}
    for key, attr in (("requests", "requests"), ("rate", "rate"), ("cv", "cv"), ("alpha", "alpha"),
                      ("prompt_range", "prompt_len"), ("output_range", "output_len"), ("max_batch_size", "max_batch_size"),
                      ("max_adapters_per_step", "max_adapters_per_step"), ("mode", "mode"), ("registered", "registered"),
                      ("check_budget_mib", "check_budget_mib"), ("host_budget_mib", "host_budget_mib"),
                      ("seed", "seed"), ("dtype", "dtype")):
        if getattr(args, attr) is not None:
            chosen[key] = getattr(args, attr)
    if args.adapters:
        chosen["adapter_counts"] = tuple(int(v) for v in args.adapters.split(","))
    if args.systems:
        chosen["systems"] = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    return Settings(device=device, **chosen)


def main(argv: list[str] | None = None) -> BenchResult:
    import transformers

    import lorakit.models

    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    settings.validate()
    if torch.device(settings.device).type == "cpu":
        from lorakit.core.precision import flush_denormals

        flush_denormals()  # as lorakit serve does on a CPU; process-wide, so every system alike
    transformers.logging.set_verbosity_error()  # generate's notes on unused sampling fields
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/serve.py", *given])
    env = step_bench.environment(step_bench.Settings(device=settings.device, dtype=settings.dtype))
    print("serving benchmark (lorakit engine vs PEFT, S-LoRA's workload)")
    for key, value in env.items():
        print(f"  {key}: {value}")
    if args.random_init_from is not None:
        from transformers import AutoTokenizer

        model = step_bench.random_init_factory(args.random_init_from)()
        tokenizer = AutoTokenizer.from_pretrained(args.random_init_from, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        model, tokenizer = lorakit.models.load(args.model)
    questions = question_tokens(tokenizer, args.gsm8k / "test.jsonl")
    root = Path(tempfile.mkdtemp(prefix="lorakit-serve-bench-"))
    try:
        result = measure(model, tokenizer, settings, root, questions, log=lambda line: print(line, flush=True))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = args.out or REPO_ROOT / "bench" / "results" / (
        f"serve_{torch.device(settings.device).type}{'_quick' if args.quick else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    env["wall time (whole command)"] = f"{time.perf_counter() - started:.0f} s"
    env["load average at the end"] = step_bench._load_average()
    png = out.with_suffix(".png")
    plot(result, png)
    out.write_text(format_markdown(result, env, command, png.name))
    table = [HEADER] + rows(result)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    print()
    for row in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("\n".join(targets(result)))
    print(f"\nwrote {out}, {png.name} ({env['wall time (whole command)']})")
    return result


if __name__ == "__main__":
    main()
