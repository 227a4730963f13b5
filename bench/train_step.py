"""One LoRA training step, lorakit against PEFT, measured alternately in one process.

The step is forward + backward + AdamW step + zero_grad for LoRA (r=16, alpha=32, no dropout)
on every linear layer except the output head, on one fixed batch of random token ids whose
labels are the ids themselves. Two copies of the base model are built with the same factory;
one gets lorakit's adapters, the other PEFT's. After warm-up steps, each round runs a block of
steps of one framework and then of the other (the order swaps every round), so slow drift of the
machine (thermal, background load) falls on both alike. Reported: the median step time, a
memory figure (see below) and the ratios lorakit / PEFT; the target is <= 1.0 for both. On CPU
each step also records the share of its threads' time the process got, so steps slowed down by
other processes are flagged rather than silently mixed in.

Precision (`--dtype`). float32: everything in float32, as before. bfloat16: lorakit's
mixed-precision recipe (`lorakit.core.precision`) for both frameworks alike -- base weights stored in
bf16, each step under `torch.autocast(device, bfloat16)`, adapter parameters and AdamW state in
float32, the loss in float32 -- on CPU and CUDA. The setup printed names the dtype, what the
device's bf16 support was decided from (CPU flags and torch's kernels, or the CUDA device), and the
measured throughput of a 256x576 @ 576x1536 product in each dtype, so results from different
machines can be read side by side.

Memory. On CUDA, the allocator's peak during a step minus what was allocated just before it
(the resident models and AdamW state), median over the timed steps. On every device, also an
accounting of what a step adds, measured on the last warm-up step: the bytes of the unique
storages saved for backward (through `torch.autograd.graph.saved_tensors_hooks`; parameters
and buffers excluded) plus the trainable parameters, their gradients and the AdamW state. On
CPU there is no allocator peak counter, so that accounting is the memory figure there.

    .venv/bin/python bench/train_step.py            # default model, CPU or CUDA (auto)
    .venv/bin/python bench/train_step.py --quick    # seconds-long smoke run
    .venv/bin/python bench/train_step.py --dtype bfloat16 --out bench/results/train_step_cpu_bf16.md
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lorakit.core import precision

FRAMEWORKS = ("lorakit", "peft")
# On CPU, a step whose process got less than this share of its threads' wall time ran beside
# other work: with OpenMP threads waiting on each other such a step can be 10x slower.
CONTENDED_SHARE = 0.75
REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


@dataclass
class Settings:
    """What one benchmark run does (all of it is printed and written to the results file)."""

    device: str = "cpu"
    dtype: str = "float32"
    # One step per block, alternating every step: on a shared CPU, other work comes and goes in
    # bursts of minutes, and adjacent steps of the two frameworks are the fairest pairs.
    steps: int = 1  # timed steps per framework per round
    rounds: int = 9
    warmup: int = 2  # untimed steps per framework before the rounds (>= 1: AdamW state appears there)
    batch_size: int = 8
    seq_len: int = 128
    rank: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    seed: int = 0
    loss: str = "fused"  # "fused": lorakit.train.loss (what lorakit train runs); "hf": model(**batch).loss

    def validate(self) -> None:
        for name in ("steps", "rounds", "warmup", "batch_size", "seq_len", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {', '.join(LOSSES)}")


DTYPES = precision.DTYPES
LOSSES = ("fused", "hf")
LOSS_NAMES = {"fused": "lorakit.train.loss (fused head + cross-entropy, as lorakit train)",
              "hf": "transformers' model(**batch).loss"}


@dataclass
class FrameworkResult:
    """Raw measurements of one framework."""

    name: str
    trainable_params: int
    step_times_s: list[float] = field(default_factory=list)
    saved_bytes: int = 0  # unique storages saved for backward, parameters and buffers excluded
    state_bytes: int = 0  # trainable parameters + gradients + AdamW state
    cuda_peak_bytes: list[int] = field(default_factory=list)  # per timed step, above the resident set
    cpu_share: list[float] = field(default_factory=list)  # CPU only: process CPU time / (wall time x threads)
    loss: float = math.nan  # loss of the accounted warm-up step (a sanity check, not a result)
    dtypes: str = ""  # what ran, read off the accounted step: frozen weights, trainable, AdamW state, logits, loss

    @property
    def median_time_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def contended(self) -> list[bool]:
        """Per timed step: did other processes take a large share of the CPU (CPU runs only)?"""
        return [share < CONTENDED_SHARE for share in self.cpu_share]

    @property
    def accounted_bytes(self) -> int:
        return self.saved_bytes + self.state_bytes

    @property
    def memory_bytes(self) -> float:
        """The headline memory figure: the allocator peak on CUDA, the accounting elsewhere."""
        if self.cuda_peak_bytes:
            return statistics.median(self.cuda_peak_bytes)
        return float(self.accounted_bytes)


@dataclass
class BenchResult:
    settings: Settings
    model_name: str
    model_params: int
    results: dict[str, FrameworkResult]

    @property
    def memory_measure(self) -> str:
        if torch.device(self.settings.device).type == "cuda":
            return ("CUDA allocator: torch.cuda.max_memory_allocated() during a step minus "
                    "memory_allocated() just before it (models and AdamW state resident), median over timed steps")
        return ("accounting (no allocator peak counter on CPU): unique storages saved for backward "
                "(saved_tensors_hooks, parameters/buffers excluded) + trainable params + grads + AdamW state")

    def time_ratio(self) -> float:
        return self.results["lorakit"].median_time_s / self.results["peft"].median_time_s

    def paired_time_ratio(self) -> float:
        """Median over rounds of (lorakit's median / PEFT's median in that round): the two blocks of
        a round ran back to back, so drift between rounds cancels."""
        n = self.settings.steps
        lk, pf = self.results["lorakit"].step_times_s, self.results["peft"].step_times_s
        return statistics.median(statistics.median(lk[i:i + n]) / statistics.median(pf[i:i + n])
                                 for i in range(0, len(lk), n))

    def memory_ratio(self) -> float:
        return self.results["lorakit"].memory_bytes / self.results["peft"].memory_bytes

    def accounted_ratio(self) -> float:
        return self.results["lorakit"].accounted_bytes / self.results["peft"].accounted_bytes


# --- the two frameworks ----------------------------------------------------------------------
def with_lorakit(model: nn.Module, settings: Settings) -> nn.Module:
    import lorakit

    return lorakit.inject(model, lorakit.LoraConfig(r=settings.rank, alpha=settings.alpha, target_modules="all-linear"))


def with_peft(model: nn.Module, settings: Settings) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules="all-linear", lora_dropout=0.0)
    return peft.get_peft_model(model, config)


ADAPT = {"lorakit": with_lorakit, "peft": with_peft}


# --- one step ----------------------------------------------------------------------------------
def step_loss(model: nn.Module, batch: dict[str, torch.Tensor], loss: str = "fused"):
    """(loss, logits or None): lorakit's fused head + cross-entropy where it applies (the loss
    `lorakit train` computes; the same for both frameworks), else transformers' own."""
    from lorakit.train.loss import causal_lm_loss, fused_loss_supported

    if loss == "fused" and fused_loss_supported(model):
        return causal_lm_loss(model, batch), None
    output = model(**batch, use_cache=False)
    return output.loss, output.logits


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               dtype: torch.dtype = torch.float32, loss_kind: str = "fused") -> torch.Tensor:
    """One optimisation step on `batch` (model inputs including `labels`) computed in `dtype`
    (`precision.autocast`); returns the loss."""
    device = next(model.parameters()).device
    with precision.autocast(dtype, device, batch["input_ids"].shape[-1]):
        loss = step_loss(model, batch, loss_kind)[0]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def accounted_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   result: FrameworkResult, dtype: torch.dtype = torch.float32, loss_kind: str = "fused") -> None:
    """One (untimed) step that records what it adds: saved-for-backward storages and training state."""
    resident = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}  # storage address -> bytes; a storage saved twice counts once

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    device = next(model.parameters()).device
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            precision.autocast(dtype, device, batch["input_ids"].shape[-1]):
        loss, logits = step_loss(model, batch, loss_kind)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    grad_bytes = sum(_tensor_bytes(p.grad) for p in trainable if p.grad is not None)
    optimizer.step()
    adam_bytes = sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                     if isinstance(v, torch.Tensor))
    optimizer.zero_grad(set_to_none=True)
    result.saved_bytes = sum(saved.values())
    result.state_bytes = sum(_tensor_bytes(p) for p in trainable) + grad_bytes + adam_bytes
    result.loss = loss.item()

    def names(tensors) -> str:
        return "/".join(sorted({precision.dtype_name(t.dtype) for t in tensors})) or "none"

    state = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
    result.dtypes = (f"frozen weights {names(frozen)}, trainable {names(trainable)}, AdamW state {names(state)}, "
                     f"logits {names([logits]) if logits is not None else 'never materialised (fused head + loss)'}, "
                     f"loss {names([loss])}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the benchmark -------------------------------------------------------------------------------
def measure(model_factory: Callable[[], nn.Module], settings: Settings,
            log: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Build two models with `model_factory` (a fresh base model per call), adapt one with each
    framework, and time training steps alternately. `log` receives progress lines."""
    settings.validate()
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    results: dict[str, FrameworkResult] = {}
    model_name = model_params = vocab_size = None
    for name in FRAMEWORKS:
        base = model_factory()
        if model_name is None:  # describe the base before any adapter is added
            config = base.config
            vocab_size = config.vocab_size
            model_name = f"{getattr(config, '_name_or_path', '') or 'random init'} ({type(base).__name__})"
            model_params = sum(p.numel() for p in base.parameters())
        # The recipe of lorakit.core.precision for both: base weights stored in `dtype`, adapters
        # float32 (lorakit.inject and PEFT's get_peft_model both keep adapters fp32 on a bf16 base).
        precision.prepare_model(base.to(device), dtype)
        torch.manual_seed(settings.seed)  # same adapter initialisation stream for both
        model = ADAPT[name](base, settings).to(device)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        models[name] = model
        optimizers[name] = torch.optim.AdamW(trainable, lr=settings.lr)
        results[name] = FrameworkResult(name, trainable_params=sum(p.numel() for p in trainable))
    if results["lorakit"].trainable_params != results["peft"].trainable_params:
        log(f"WARNING: trainable parameters differ: lorakit {results['lorakit'].trainable_params:,} "
            f"vs peft {results['peft'].trainable_params:,}; the comparison is not like for like")

    generator = torch.Generator().manual_seed(settings.seed)
    input_ids = torch.randint(0, vocab_size, (settings.batch_size, settings.seq_len), generator=generator).to(device)
    batch = {"input_ids": input_ids, "labels": input_ids}

    for name in FRAMEWORKS:
        for i in range(settings.warmup):
            if i == settings.warmup - 1:
                accounted_step(models[name], optimizers[name], batch, results[name], dtype, settings.loss)
            else:
                train_step(models[name], optimizers[name], batch, dtype, settings.loss)
        _sync(device)
        log(f"  warm-up {name}: {settings.warmup} step(s), loss {results[name].loss:.3f}")

    for round_index in range(settings.rounds):
        order = FRAMEWORKS if round_index % 2 == 0 else FRAMEWORKS[::-1]
        for name in order:
            model, optimizer, result = models[name], optimizers[name], results[name]
            gc.collect()
            for _ in range(settings.steps):
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                train_step(model, optimizer, batch, dtype, settings.loss)
                _sync(device)
                wall = time.perf_counter() - start
                result.step_times_s.append(wall)
                if device.type == "cpu":
                    result.cpu_share.append((time.process_time() - start_cpu) / (wall * torch.get_num_threads()))
                if device.type == "cuda":
                    result.cuda_peak_bytes.append(torch.cuda.max_memory_allocated(device) - before)
            log(f"  round {round_index + 1}/{settings.rounds} {name}: {_raw_times(result, -settings.steps)} ms")

    return BenchResult(settings, model_name, model_params, results)


# --- reporting ---------------------------------------------------------------------------------
def results_head(title: str, command: str) -> list[str]:
    """The opening lines of every bench/results/*.md: the title and the command that produced it."""
    return [title, "", "Produced by:", "", "```", command, "```", ""]


def environment(settings: Settings) -> dict[str, str]:
    import peft
    import transformers

    import lorakit

    device = torch.device(settings.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else precision.cpu_model()
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        if changed and commit != "unknown":
            commit += " + uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "device": f"{device} ({device_name})",
        "dtype": settings.dtype + (f" (float32 matmul precision: {torch.get_float32_matmul_precision()})"
                                   if settings.dtype == "float32" else ""),
        "CPU vector/matrix flags": " ".join(sorted(f for f in precision.cpu_flags() if f.startswith(("avx", "amx", "fma"))))
                                   or "unknown (no /proc/cpuinfo)",
        "bf16 support": f"{'fast' if precision.bf16_support(device.type).fast else 'NOT fast (emulated)'}: "
                        f"{precision.bf16_support(device.type).evidence}",
        "threads": str(torch.get_num_threads()),
        "matmul peak (256x576 @ 576x1536, measured)": matmul_peaks(device),
        "torch": torch.__version__ + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorakit": f"{lorakit.__version__} (git {commit})",
        "python": platform.python_version(),
        "load average (1 min)": _load_average(),
    }


def matmul_peaks(device: torch.device) -> str:
    """Measured GFLOP/s of the probe product in each dtype at the current thread count: the
    machine's ceiling, against which a step's speed-up in bf16 is read."""
    peaks = {name: precision.matmul_gflops(dtype, device) for name, dtype in DTYPES.items()}
    return (", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items())
            + f" (bf16/fp32 {peaks['bfloat16'] / peaks['float32']:.2f}x)")


def _load_average() -> str:
    """Other work on the machine slows CPU steps down; the load average shows how much there was."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} logical CPUs"
    except OSError:
        return "unavailable"


def describe(result: BenchResult) -> str:
    s = result.settings
    trainable = result.results["lorakit"].trainable_params
    return (f"LoRA r={s.rank} alpha={s.alpha:g} dropout 0 on all linear layers except the head of "
            f"{result.model_name}, {result.model_params / 1e6:.1f}M base parameters, {trainable:,} trainable; "
            f"batch {s.batch_size} x {s.seq_len} random token ids (seed {s.seed}), labels = inputs; "
            f"AdamW lr {s.lr:g}; loss {LOSS_NAMES[s.loss]}; step = forward + backward + optimizer.step + zero_grad; "
            f"{s.warmup} warm-up step(s) each, then {s.rounds} round(s) x {s.steps} step(s) each, "
            f"alternating lorakit/peft (order swapped every round)")


def _raw_times(result: FrameworkResult, start: int = 0) -> str:
    """Step times in ms; on CPU each with the CPU share it got, '!' marking contended steps."""
    cells = []
    for i in range(len(result.step_times_s))[start:]:
        cell = f"{result.step_times_s[i] * 1e3:.1f}"
        if result.cpu_share:
            cell += f" (cpu {result.cpu_share[i]:.2f}{'!' if result.contended[i] else ''})"
        cells.append(cell)
    return ", ".join(cells)


def contention_note(result: BenchResult) -> str | None:
    counts = {name: sum(r.contended) for name, r in result.results.items()}
    if not any(counts.values()):
        return None
    total = len(result.results["lorakit"].step_times_s)
    note = (f"WARNING: other processes competed for the CPU: contended steps (CPU share < {CONTENDED_SHARE}, "
            f"marked '!') lorakit {counts['lorakit']}/{total}, peft {counts['peft']}/{total}. Medians mixing "
            "contended and free steps are unreliable; rerun on a quiet machine.")
    free = {name: [t for t, c in zip(r.step_times_s, r.contended) if not c] for name, r in result.results.items()}
    if all(free.values()):
        medians = {name: statistics.median(times) for name, times in free.items()}
        note += (" Medians over uncontended steps only: "
                 + ", ".join(f"{name} {medians[name] * 1e3:.1f} ms ({len(free[name])} steps)" for name in FRAMEWORKS)
                 + f", ratio {medians['lorakit'] / medians['peft']:.3f}.")
    return note


def _verdict(ratio: float) -> str:
    return "met" if ratio <= 1.0 else "NOT met"


def _time_verdict(result: BenchResult) -> str:
    if contention_note(result):
        return "not judged, steps were contended: see the WARNING"
    return _verdict(result.time_ratio())


def _rows(result: BenchResult) -> list[list[str]]:
    cuda = any(r.cuda_peak_bytes for r in result.results.values())
    rows = []
    for name in FRAMEWORKS:
        r = result.results[name]
        row = [name, f"{r.median_time_s * 1e3:.1f}", f"{min(r.step_times_s) * 1e3:.1f}",
               f"{max(r.step_times_s) * 1e3:.1f}"]
        if cuda:
            row.append(f"{r.memory_bytes / MIB:.1f}")
        row += [f"{r.saved_bytes / MIB:.1f}", f"{r.state_bytes / MIB:.1f}", f"{r.accounted_bytes / MIB:.1f}"]
        rows.append(row)
    ratio = ["lorakit / peft", f"{result.time_ratio():.3f}", "", ""]
    if cuda:
        ratio.append(f"{result.memory_ratio():.3f}")
    ratio += [_ratio(result, "saved_bytes"), _ratio(result, "state_bytes"), f"{result.accounted_ratio():.3f}"]
    rows.append(ratio)
    return rows


def _ratio(result: BenchResult, attr: str) -> str:
    a, b = getattr(result.results["lorakit"], attr), getattr(result.results["peft"], attr)
    return f"{a / b:.3f}" if b else "n/a"


def _header(result: BenchResult) -> list[str]:
    header = ["framework", "median step (ms)", "min (ms)", "max (ms)"]
    if any(r.cuda_peak_bytes for r in result.results.values()):
        header.append("CUDA peak above resident (MiB)")
    return header + ["saved for backward (MiB)", "params+grads+AdamW (MiB)", "accounted step memory (MiB)"]


def format_text(result: BenchResult, env: dict[str, str]) -> str:
    header, rows = _header(result), _rows(result)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["setup:"] + [f"  {key}: {value}" for key, value in env.items()]
    lines += [f"  run: {describe(result)}", "", "results:"]
    for row in [header] + rows:
        lines.append("  " + "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    lines += [
        "",
        f"  memory measure: {result.memory_measure}",
        f"  time ratio lorakit/peft:   {result.time_ratio():.3f} (target <= 1.0: {_time_verdict(result)}); "
        f"median of per-round ratios {result.paired_time_ratio():.3f}",
        f"  memory ratio lorakit/peft: {result.memory_ratio():.3f} (target <= 1.0: {_verdict(result.memory_ratio())})",
    ]
    note = contention_note(result)
    if note:
        lines.append("  " + note)
    for name in FRAMEWORKS:
        lines.append(f"  dtypes {name}: {result.results[name].dtypes}")
    for name in FRAMEWORKS:
        lines.append(f"  raw step times {name} (ms): {_raw_times(result.results[name])}")
    return "\n".join(lines)


def format_markdown(result: BenchResult, env: dict[str, str], command: str) -> str:
    header, rows = _header(result), _rows(result)
    lines = [
        *results_head("# One LoRA training step: lorakit vs PEFT", command),
        describe(result) + ".",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        f"Memory measure: {result.memory_measure}.",
        "",
        f"- time ratio lorakit/peft: **{result.time_ratio():.3f}** (target <= 1.0: {_time_verdict(result)}); "
        f"median of the per-round ratios (each round's two blocks ran back to back): {result.paired_time_ratio():.3f}",
        f"- memory ratio lorakit/peft: **{result.memory_ratio():.3f}** "
        f"(target <= 1.0: {_verdict(result.memory_ratio())})",
        "",
        *([contention_note(result), ""] if contention_note(result) else []),
        "What ran (read off the accounted warm-up step):",
        "",
        *[f"- {name}: {result.results[name].dtypes}" for name in FRAMEWORKS],
        "",
        "Raw step times (ms, in the order run"
        + ("; on CPU with the share of the threads' time the process got" if any(
            r.cpu_share for r in result.results.values()) else "") + "):",
        "",
        *[f"- {name}: {_raw_times(result.results[name])}" for name in FRAMEWORKS],
        "",
    ]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------
QUICK = dict(steps=1, rounds=1, warmup=1, batch_size=1, seq_len=16)
# A CPU step of the default model takes ~3.6 s on 2 cores, so the CPU default (Settings: 2 warm-up,
# 9 rounds x 1 step) runs in ~2 minutes; a GPU step takes ~0.15 s, so on CUDA more steps cost
# nothing, and short blocks with many rounds pair the two frameworks closely in time.
CUDA_DEFAULTS = dict(steps=2, rounds=25, warmup=5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="'auto' (default: cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    parser.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES),
                        help="float32, or bfloat16: base weights in bf16, steps under autocast, adapters and AdamW "
                             "state in float32 (lorakit.core.precision) [float32]")

    def on(key: str) -> str:
        return f"[{getattr(defaults, key)} on CPU, {CUDA_DEFAULTS[key]} on CUDA]"

    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per framework per round {on('steps')}")
    parser.add_argument("--rounds", type=int, default=None, help=f"alternation rounds {on('rounds')}")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed steps per framework, >= 1 {on('warmup')}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"sequences per batch [{defaults.batch_size}]")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence [{defaults.seq_len}]")
    parser.add_argument("--rank", type=int, default=defaults.rank, help=f"LoRA rank r, alpha = 2 r [{defaults.rank}]")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the token ids and adapter init [0]")
    parser.add_argument("--loss", default=defaults.loss, choices=LOSSES,
                        help="fused: lorakit.train.loss, what lorakit train runs; hf: model(**batch).loss [fused]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) + " (explicit options win)")
    parser.add_argument("--random-init-from", type=Path, default=None, metavar="CONFIG_DIR",
                        help="build the base from this config.json with random weights (same compute as the real "
                             "model; for machines without the default model, e.g. bench/configs/smollm2-135m-instruct)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown results file (default: bench/results/train_step_<device>[_quick].md)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = dict(QUICK) if args.quick else dict(CUDA_DEFAULTS) if torch.device(device).type == "cuda" else {}
    for key in ("steps", "rounds", "warmup", "batch_size", "seq_len"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return Settings(device=device, dtype=args.dtype, rank=args.rank, alpha=2.0 * args.rank, seed=args.seed,
                    loss=args.loss, **chosen)


def random_init_factory(config_dir: Path) -> Callable[[], nn.Module]:
    from transformers import AutoConfig, AutoModelForCausalLM

    def build() -> nn.Module:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(config_dir)
        config._name_or_path = f"{config_dir.name} (random init)"
        return AutoModelForCausalLM.from_config(config)

    return build


def default_model_factory() -> nn.Module:
    import lorakit.models

    model, _ = lorakit.models.load()
    return model


def main(argv: list[str] | None = None) -> BenchResult:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    settings.validate()
    if torch.device(settings.device).type == "cpu":
        precision.flush_denormals()  # as `lorakit train` does for its run; this process is the benchmark's
    out = args.out or REPO_ROOT / "bench" / "results" / (
        f"train_step_{torch.device(settings.device).type}{'_bf16' if settings.dtype == 'bfloat16' else ''}"
        f"{'_quick' if args.quick else ''}.md")
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/train_step.py", *given])  # run from the repository root
    env = environment(settings)
    print("train_step benchmark (lorakit vs PEFT)")
    for key, value in env.items():
        print(f"  {key}: {value}")
    print("  measuring ...", flush=True)
    factory = random_init_factory(args.random_init_from) if args.random_init_from else default_model_factory
    result = measure(factory, settings, log=lambda line: print(line, flush=True))
    env["load average (1 min)"] = f"{env['load average (1 min)']} at start, {_load_average()} at end"
    print()
    print(format_text(result, env))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_markdown(result, env, command))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
