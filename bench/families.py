"""Every adapter family against LoRA (r=16) on the default model and the default task, one run.

For LoRA r=16 and each family at its paper's default configuration (the config class's defaults,
which follow the paper or its official code; see each module's docstring), the same base model is
trained for the same number of AdamW steps on the same batches of the built-in default task, then
scored on its held-out split. Reported per family, each also as a ratio to LoRA from the same run:

- trainable parameters;
- step time: median wall time of a training step (forward + backward + AdamW step + zero_grad)
  over the steps after the warm-up, on identical batches for every family;
- step memory: on CUDA the allocator's peak during a step above what was allocated just before it,
  median over the timed steps; on CPU (no peak counter) the accounting of `bench/train_step.py`:
  storages saved for backward + trainable parameters, gradients and AdamW state;
- eval loss (mean cross-entropy per response token on the held-out prompts) after the steps.

Learning rates differ by family, as in the papers: methods that train only scaling vectors or a
tiny core take larger steps than LoRA (`LR_MULTIPLIER` below, with its source); `--lr` with
`--same-lr` runs every family at one rate instead.

    .venv/bin/python bench/families.py                 # all registered families, 32 steps
    .venv/bin/python bench/families.py --quick         # seconds-long smoke run
    .venv/bin/python bench/families.py --only lora,vera
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as step_bench  # noqa: E402  (the shared step, memory accounting and environment)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BASELINE = "LoRA r=16"

# Step sizes relative to LoRA's, from the papers' own recipes: VeRA trains only scaling vectors
# (its GLUE runs use ~10x LoRA's lr), NOLA's coefficients 5e-3 vs LoRA 2e-4 on GPT-2, LoLDU's
# diagonal "1e-3..1e-2", DiffuseKronA 1e-3 vs LoRA-DreamBooth 1e-4. Capped at 5x here: the default
# task's LoRA rate (2e-3) is already high. LoRA-XS (4e-3 vs LoRA 2e-4 on math in its paper) stays
# at 1x: its frozen A carries W's singular values, so with s = 1 an R step moves dW by S_1 times
# as much as a LoRA step (5x diverged in a 3-step smoke run). The others (Bone, RandLoRA,
# Block-LoRA, LaMDA) use LoRA-like rates in their papers.
LR_MULTIPLIER = {"vera": 5.0, "nola": 5.0, "loldu": 5.0, "kron": 5.0}


@dataclass(frozen=True)
class Family:
    label: str
    method: str
    fields: dict = field(default_factory=dict)  # config fields besides the class defaults


# Methods that only train with a rank policy driving them (AdaLoRA's allocator): `bench/rank.py`.
NEEDS_RANK_POLICY = {"adalora", "increlora"}


def default_families() -> list[Family]:
    """LoRA r=16, then every other registered method at its config class's defaults."""
    import lorakit

    families = [Family(BASELINE, "lora", {"r": 16, "alpha": 32.0})]
    families += [Family(name, name) for name in lorakit.registered_methods()
                 if name != "lora" and name not in NEEDS_RANK_POLICY]
    return families


@dataclass
class Settings:
    steps: int = 32
    warmup_steps: int = 3  # learning-rate warm-up, and the steps left out of the timing
    batch_size: int = 8
    max_length: int = 96
    lr: float = 2e-3
    same_lr: bool = False
    eval_examples: int = 100
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")


@dataclass
class FamilyResult:
    family: Family
    config: str
    lr: float
    trainable_params: int
    step_times_s: list[float]
    memory_bytes: float
    eval_loss: float
    final_train_loss: float

    @property
    def median_time_s(self) -> float:
        return statistics.median(self.step_times_s)


def training_batches(tokenizer, examples, settings) -> list[dict[str, torch.Tensor]]:
    """`settings.steps` batches of `settings.batch_size` (seeded order, cycling), the same for every method."""
    from lorakit.data import DataCollator, encode

    collate = DataCollator.from_tokenizer(tokenizer)
    encoded = [encode(tokenizer, example, settings.max_length) for example in examples]
    order = list(range(len(encoded)))
    random.Random(settings.seed).shuffle(order)
    batches = []
    while len(batches) < settings.steps:
        for start in range(0, len(order) - settings.batch_size + 1, settings.batch_size):
            batches.append(collate([encoded[i] for i in order[start:start + settings.batch_size]]))
            if len(batches) == settings.steps:
                break
    return batches


def _timed_step(model, optimizer, batch, device: torch.device) -> tuple[float, float, float | None]:
    """(seconds, loss, CUDA peak above what was allocated before the step, or None on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    loss = step_bench.train_step(model, optimizer, batch).item()
    if device.type != "cuda":
        return time.perf_counter() - start, loss, None
    torch.cuda.synchronize(device)
    return time.perf_counter() - start, loss, float(torch.cuda.max_memory_allocated(device) - before)


def _accounted_memory(model, optimizer, batch) -> tuple[float, float]:
    """(bytes, loss) of one untimed CPU step: `bench/train_step.py`'s accounting."""
    accounting = step_bench.FrameworkResult("family", trainable_params=0)
    step_bench.accounted_step(model, optimizer, batch, accounting)
    return float(accounting.accounted_bytes), accounting.loss


def run_family(family: Family, base: nn.Module, tokenizer, batches, eval_examples, settings: Settings) -> FamilyResult:
    import lorakit
    from lorakit.core.registry import method_spec
    from lorakit.train.evaluate import response_loss
    from transformers import get_cosine_schedule_with_warmup

    device = torch.device(settings.device)
    config = method_spec(family.method).config_cls(**family.fields)
    torch.manual_seed(settings.seed)
    model = lorakit.inject(copy.deepcopy(base), config).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = settings.lr * (1.0 if settings.same_lr else LR_MULTIPLIER.get(family.method, 1.0))
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    hooks = step_hooks(family, model, optimizer, settings.steps)
    times, memories, loss = [], [], math.nan
    for step, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        hooks.before(step)
        if device.type == "cpu" and step == settings.warmup_steps:
            memory, loss = _accounted_memory(model, optimizer, batch)  # untimed: its hooks slow the step
            memories.append(memory)
        else:
            seconds, loss, peak = _timed_step(model, optimizer, batch, device)
            if step >= settings.warmup_steps:
                times.append(seconds)
                if peak is not None:
                    memories.append(peak)
        hooks.after(step)
        schedule.step()
    eval_loss = response_loss(model, tokenizer, eval_examples, settings.max_length)
    count = sum(p.numel() for p in trainable)  # at the start (LaMDA freezes B while training)
    return FamilyResult(family, _describe_config(config), lr, count, times or [math.nan],
                        statistics.median(memories) if memories else math.nan, eval_loss, loss)


def _describe_config(config) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in ("target_modules",)}
    return ", ".join(f"{k}={v}" for k, v in fields.items())


class StepHooks:
    """Work a method does around each optimizer step; none by default."""

    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> None:
        pass


class LamdaFreezing(StepHooks):
    """LaMDA's progressive freezing of B is part of the method, so it runs in this loop too."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int):
        from lorakit.train.callbacks import LamdaFreezer

        self.freezer, self.optimizer = LamdaFreezer(model, max_steps=steps), optimizer

    def before(self, step: int) -> None:
        self.freezer.begin_step(step, self.optimizer)

    def after(self, step: int) -> None:
        self.freezer.end_step()


def step_hooks(family: Family, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> StepHooks:
    return LamdaFreezing(model, optimizer, steps) if family.method == "lamda" else StepHooks()


def measure(base: nn.Module, tokenizer, families: list[Family], settings: Settings,
            log: Callable[[str], None] = lambda line: None) -> tuple[float, list[FamilyResult]]:
    """(base model's eval loss, one result per family); `base` is copied for every family."""
    from lorakit.data import default_task, to_example
    from lorakit.train.evaluate import response_loss

    settings.validate()
    train_records, eval_records = default_task(seed=settings.seed)
    train_examples = [to_example(r) for r in train_records]
    eval_examples = [to_example(r) for r in eval_records][: settings.eval_examples]
    batches = training_batches(tokenizer, train_examples, settings)
    base_loss = response_loss(base.to(settings.device), tokenizer, eval_examples, settings.max_length)
    log(f"  base model eval loss {base_loss:.3f}")
    results = []
    for family in families:
        started = time.perf_counter()
        result = run_family(family, base, tokenizer, batches, eval_examples, settings)
        results.append(result)
        log(f"  {family.label}: {result.trainable_params:,} trainable, step {result.median_time_s * 1e3:.0f} ms, "
            f"memory {result.memory_bytes / MIB:.1f} MiB, eval loss {result.eval_loss:.3f} "
            f"({time.perf_counter() - started:.0f} s)")
    return base_loss, results


HEADER = ["family", "trainable params", "/ LoRA", "step (ms)", "/ LoRA", "step memory (MiB)", "/ LoRA",
          "eval loss", "lr"]


def rows(results: list[FamilyResult]) -> list[list[str]]:
    baseline = next((r for r in results if r.family.label == BASELINE), results[0])
    out = []
    for r in results:
        out.append([
            r.family.label, f"{r.trainable_params:,}", f"{r.trainable_params / baseline.trainable_params:.3f}",
            f"{r.median_time_s * 1e3:.0f}", f"{r.median_time_s / baseline.median_time_s:.2f}",
            f"{r.memory_bytes / MIB:.1f}", f"{r.memory_bytes / baseline.memory_bytes:.2f}",
            f"{r.eval_loss:.3f}", f"{r.lr:g}",
        ])
    return out


def memory_measure(settings: Settings) -> str:
    if torch.device(settings.device).type == "cuda":
        return "CUDA allocator peak during a step above what was allocated before it, median over timed steps"
    return ("CPU accounting (no allocator peak counter): unique storages saved for backward + trainable "
            "parameters + gradients + AdamW state, on the first step after the warm-up")


def format_text(base_loss: float, results: list[FamilyResult], settings: Settings) -> str:
    table = [HEADER] + rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join(lines + ["", f"base model eval loss (no adapter): {base_loss:.3f}",
                              f"memory: {memory_measure(settings)}"])


def format_markdown(base_loss: float, results: list[FamilyResult], settings: Settings, env: dict[str, str],
                    command: str) -> str:
    s = settings
    lines = [
        *step_bench.results_head(
            "# Adapter families against LoRA r=16: parameters, step time, step memory, eval loss", command),
        f"Default model, built-in default task; {s.steps} AdamW steps (no weight decay, {s.warmup_steps} warm-up "
        f"steps then cosine decay), batch {s.batch_size}, max length {s.max_length}, identical batches for every "
        f"family (seed {s.seed}); eval loss = cross-entropy per response token on {s.eval_examples} held-out "
        f"prompts. Step time: median over the steps after the warm-up. Memory: {memory_measure(s)}. "
        f"Ratios are to {BASELINE} in this run.",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *["| " + " | ".join(row) + " |" for row in rows(results)],
        "",
        f"Base model eval loss (no adapter): {base_loss:.3f}.",
        "",
        "Configurations (class defaults unless set):",
        "",
        *[f"- {r.family.label}: {r.config}" for r in results],
        "",
    ]
    return "\n".join(lines)


QUICK = dict(steps=3, warmup_steps=1, batch_size=2, eval_examples=4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda'")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per family [{defaults.steps}]")
    parser.add_argument("--batch-size", type=int, default=None, help=f"[{defaults.batch_size}]")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"LoRA's learning rate [{defaults.lr}]")
    parser.add_argument("--same-lr", action="store_true", help="every family at --lr (no per-family multiplier)")
    parser.add_argument("--only", default=None, help="comma-separated method names (LoRA r=16 always runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/families_<device>.md)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    chosen = dict(QUICK) if args.quick else {}
    for key in ("steps", "batch_size"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if "steps" in chosen and "warmup_steps" not in chosen:
        chosen["warmup_steps"] = min(Settings.warmup_steps, chosen["steps"] - 1)
    return Settings(device=device, lr=args.lr, same_lr=args.same_lr, **chosen)


def select_families(only: str | None) -> list[Family]:
    families = default_families()
    if not only:
        return families
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    known = {f.method for f in families}
    if wanted - known:
        raise SystemExit(f"--only names unknown methods {sorted(wanted - known)}; registered: {sorted(known)}")
    return [f for f in families if f.label == BASELINE or f.method in wanted]


def main(argv: list[str] | None = None) -> list[FamilyResult]:
    import lorakit.models

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    settings.validate()
    families = select_families(args.only)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/families.py", *given])
    env = step_bench.environment(step_bench.Settings(device=settings.device))
    env.pop("peft", None)
    print("families benchmark (each family vs LoRA r=16, same run)")
    for key, value in env.items():
        print(f"  {key}: {value}")
    base, tokenizer = lorakit.models.load()
    base_loss, results = measure(base, tokenizer, families, settings, log=lambda line: print(line, flush=True))
    print()
    print(format_text(base_loss, results, settings))
    out = args.out or REPO_ROOT / "bench" / "results" / (
        f"families_{torch.device(settings.device).type}{'_quick' if args.quick else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_markdown(base_loss, results, settings, env, command))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
