"""Convergence on GSM8K: every initialiser, optimiser, LISA and adapter family against LoRA, same budget.

The default model is fine-tuned on the real GSM8K train split (`../shared/data/gsm8k/train.jsonl`
next to the repository, or `--data`) and evaluated on its test split, once per recipe and seed. A
recipe (the `RECIPES` table below: one line per method) names the adapter method and its config
fields (including `init` / `init_options`), the optimiser and its options, LISA's settings and the
learning rate. Every recipe gets, for a given seed:

- the same training batches in the same order (a seeded shuffle of the train examples that fit in
  `max_length` tokens: prompt + answer + eos, never truncated), the same number of AdamW-style
  optimiser steps, the same learning-rate schedule (linear warm-up, then cosine decay to 0), no
  weight decay, no gradient clipping; the seed also seeds the adapter's random initialisation;
- data-driven initialisers (EVA, LoRA-GA, LoRA-SB) get the first `init_batches` of those training
  batches through `lorakit.inject(..., data=batches)`, as `lorakit train` does; an initialiser
  whose options describe the run (`lr`, `warmup_ratio`, `total_steps`, e.g. LoRA-SB) is told this
  run's values unless the recipe sets them;
- optimisers come from `lorakit.optim.build_optimizer(name, model, lr, 0.0, options)`; LISA
  (full-parameter training of the embeddings, head and `active_layers` sampled decoder blocks) runs
  through its plain-loop helper `lorakit.optim.LISA.begin_step`.

Measured (the test examples are the first `eval_examples` of the test split that fit in
`max_length`; the same ones for every recipe and seed):

- eval loss: mean cross-entropy per answer token (`lorakit.train.evaluate.response_loss`: prompt
  tokens excluded, the closing eos included), every `eval_every` steps and after the last step
  (the curves; the table gives the last point, mean +- sample std over seeds);
- exact-match accuracy of greedy generations (`generate_responses`, `max_new_tokens` new tokens)
  after training, two ways (`lorakit.data.metrics`): strict = the number after the first "####"
  of the generation equals the number after the reference's "####"; flexible = the last number
  anywhere in the generation equals it. Numbers compare as decimals after dropping "$", ","
  and a trailing "." ("1,000.00" == "1000");
- steps to reach LoRA's final eval loss: the first evaluated step at which the recipe's eval loss
  (mean over seeds) is <= LoRA's final eval loss (mean over seeds) in the same run; resolution is
  `eval_every` steps; "not reached" when it never is.

Written to `bench/results/convergence_<device>[_quick].md` (command, environment, table), `.png`
(the eval-loss curves: mean over seeds, min-max band) and `.json` (every curve and score).

    .venv/bin/python bench/convergence.py --quick             # reduced form: < 10 min on 2 CPU cores
    .venv/bin/python bench/convergence.py --quick --only eva  # one recipe (LoRA always runs too)
    .venv/bin/python bench/convergence.py                     # the full run (a GPU; hours)

Full run (documented, not run in CI): 300 steps, batch 8, max length 512, 3 seeds (0, 1, 2), eval
loss every 25 steps and accuracy on the first 250 fitting test examples with 256 new tokens, every
recipe in `RECIPES` whose method has landed. On one GPU that is roughly 20 recipes x 3 seeds x a few
minutes; on 2 CPU cores a single 300-step run alone takes hours.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as families_bench  # noqa: E402  (LaMDA's step hooks, per-family learning rates)
import train_step as step_bench  # noqa: E402  (the training step, the environment block)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "gsm8k"
BASELINE = "lora"

LORA_LR = 5e-4  # LoRA r=16, alpha=32 on the 135M default model, batch 8
FULL_LR = 5e-5  # full-parameter training (LISA): an order below LoRA's, as usual for full fine-tuning
LORA = {"r": 16, "alpha": 32.0}


@dataclass(frozen=True)
class Recipe:
    """One line of the benchmark: how a method is trained. `key` is what `--only` names."""

    key: str
    label: str
    method: str | None = "lora"  # adapter method; None = no adapter (full-parameter training, LISA)
    fields: dict[str, Any] = field(default_factory=dict)  # adapter config fields besides the class defaults
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    lisa: dict[str, Any] | None = None  # lorakit.optim.LISA keyword arguments (active_layers, interval, ...)
    lr: float = LORA_LR
    note: str = ""

    @property
    def init(self) -> str:
        return self.fields.get("init", "default")

    def missing(self) -> str | None:
        """What this recipe needs that has not landed in lorakit, or None when it can run."""
        import lorakit
        from lorakit.core import registry
        from lorakit.optim import registered_optimizers

        if self.method is not None and self.method not in lorakit.registered_methods():
            return f"method {self.method!r}"
        if self.init != "default" and not (registry.data_initialiser(self.init) or registry.weight_initialiser(self.init)):
            return f"initialiser {self.init!r}"
        if self.optimizer not in registered_optimizers():
            return f"optimizer {self.optimizer!r}"
        if self.lisa is not None and not hasattr(lorakit.optim, "LISA"):
            return "lorakit.optim.LISA"
        return None


# One line per method. Learning rates: the papers use LoRA's rate for rsLoRA, PiSSA, DoRA, LoRA-GA,
# EVA, LoRA-Pro, GGPO and LoRA-SB (its official math script: 1e-4, as LoRA's); LoRA+ keeps LoRA's
# rate for A and multiplies B's by `ratio`; ALLoRA runs its paper's adapter (alpha = r, s = 1, no
# dropout) with LoRA's rate as its base rate l_b; LISA trains full blocks at a full-fine-tuning rate.
# GGPO uses the official "nlg" profile (LLM fine-tuning on math); LISA LMFlow's defaults.
RECIPES: list[Recipe] = [
    Recipe("lora", "LoRA", "lora", LORA),
    Recipe("rslora", "rsLoRA", "lora", {**LORA, "use_rslora": True}),
    Recipe("pissa", "PiSSA", "lora", {**LORA, "alpha": 16.0, "init": "pissa"}, note="alpha = r (s = 1), as the paper"),
    Recipe("dora", "DoRA", "lora", {**LORA, "use_dora": True}),
    Recipe("lora-ga", "LoRA-GA", "lora", {**LORA, "init": "lora-ga"}),
    Recipe("eva", "EVA", "lora", {**LORA, "init": "eva"}),
    Recipe("lora-sb", "LoRA-SB", "loraxs", {"init": "lora-sb"}),
    Recipe("loraxs", "LoRA-XS", "loraxs", note="LoRA-SB's structure with its own init (R = 0): the paper's baseline"),
    Recipe("loraplus", "LoRA+", "lora", LORA, optimizer="loraplus"),
    Recipe("lora-pro", "LoRA-Pro", "lora", LORA, optimizer="lora-pro"),
    Recipe("allora", "ALLoRA", "lora", {"r": 16, "alpha": 16.0, "dropout": 0.0}, optimizer="allora"),
    Recipe("ggpo", "GGPO", "lora", LORA, optimizer="ggpo", optimizer_options={"rho": 0.01, "mu": 0.8, "beta": 0.8}),
    Recipe("lisa", "LISA", None, lisa={"active_layers": 2, "interval": 20}, lr=FULL_LR),
]


def family_recipes() -> list[Recipe]:
    """Every registered adapter family besides LoRA at its config class's defaults, at the
    learning rate `bench/families.py` gives it (its `LR_MULTIPLIER`, with the papers' sources)."""
    import lorakit

    taken = {r.method for r in RECIPES} | families_bench.NEEDS_RANK_POLICY
    return [Recipe(name, name, name, lr=LORA_LR * families_bench.LR_MULTIPLIER.get(name, 1.0))
            for name in lorakit.registered_methods() if name not in taken]


def all_recipes() -> list[Recipe]:
    return RECIPES + family_recipes()


def select_recipes(only: str | None) -> tuple[list[Recipe], dict[str, str]]:
    """(the recipes to run, {key: what is missing} for those that cannot run yet). LoRA always runs."""
    recipes = all_recipes()
    known = {r.key: r for r in recipes}
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(f"--only names unknown recipes {unknown}; known: {', '.join(known)}")
    else:
        wanted = list(known)
    chosen = [known[BASELINE]] + [known[k] for k in dict.fromkeys(wanted) if k != BASELINE]
    missing = {r.key: r.missing() for r in chosen if r.missing()}
    if only and missing:
        raise SystemExit("cannot run " + "; ".join(f"{k} (needs {v})" for k, v in missing.items()))
    return [r for r in chosen if r.key not in missing], missing


@dataclass
class Settings:
    steps: int = 300
    warmup_steps: int = 10
    batch_size: int = 8
    max_length: int = 512
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 25
    eval_examples: int = 250
    max_new_tokens: int = 256
    init_batches: int = 8
    # Forward passes a data-driven initialiser may cycle its batches for (EVA's `max_batches`);
    # None keeps the initialiser's own cap (EVA: 1000, stopping earlier once converged).
    init_max_passes: int | None = None
    device: str = "cpu"
    lr_scale: float = 1.0  # every recipe's rate times this (`--lr-scale`)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length", "eval_every", "eval_examples", "max_new_tokens",
                     "init_batches", "init_max_passes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not self.seeds:
            raise ValueError("at least one seed is needed")


# Every recipe runs in the quick form too. EVA's components need not converge at tau = 0.99 on two
# batches of two examples (near-equal singular values keep rotating), so it stops after 32 passes
# there and uses the estimate it has, with a warning naming the layers.
QUICK = dict(steps=4, warmup_steps=1, batch_size=2, max_length=256, seeds=(0,), eval_every=2, eval_examples=4,
             max_new_tokens=32, init_batches=2, init_max_passes=32)


# --- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    train: list[dict[str, list[int]]]  # encoded train examples that fit in max_length
    test: list  # lorakit.data.Example: the evaluation examples
    references: list[str]  # their reference answers (the full GSM8K solutions)
    dropped_train: int
    dropped_test: int


def _encode_whole(tokenizer, example, max_length: int) -> dict | None:
    """The encoded example when prompt + response + eos fit in max_length untruncated, else None."""
    from lorakit.data import encode

    encoded = encode(tokenizer, example, max_length=1 << 30)
    return encoded if len(encoded["input_ids"]) <= max_length else None


def load_data(folder: Path, tokenizer, settings: Settings, train_limit: int | None = None) -> Data:
    """GSM8K's train and test splits from `folder`, encoded; over-long examples are dropped, never cut.

    Only as many train examples as the run needs are encoded (`train_limit`, default
    steps x batch size x number of seeds, over a shuffle fixed by seed 0)."""
    from lorakit.data import load_records, to_example

    train_records = load_records(folder, split="train")
    test_records = load_records(folder, split="test")
    order = list(range(len(train_records)))
    random.Random(0).shuffle(order)
    need = train_limit or settings.steps * settings.batch_size * len(settings.seeds)
    train, dropped_train = [], 0
    for index in order:
        encoded = _encode_whole(tokenizer, to_example(train_records[index]), settings.max_length)
        if encoded is None:
            dropped_train += 1
            continue
        train.append(encoded)
        if len(train) == need:
            break
    test, references, dropped_test = [], [], 0
    for record in test_records:
        example = to_example(record)
        if _encode_whole(tokenizer, example, settings.max_length) is None:
            dropped_test += 1
            continue
        test.append(example)
        references.append(example.response)
        if len(test) == settings.eval_examples:
            break
    if not train or not test:
        raise SystemExit(f"no GSM8K example fits in max_length={settings.max_length}; raise --max-length")
    return Data(train, test, references, dropped_train, dropped_test)


def batches_for_seed(data: Data, tokenizer, settings: Settings, seed: int) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of `batch_size` train examples in a seeded order (cycling when they run out);
    identical for every recipe."""
    from lorakit.data import DataCollator

    collate = DataCollator.from_tokenizer(tokenizer)
    order = list(range(len(data.train)))
    random.Random(seed).shuffle(order)
    batches, position = [], 0
    while len(batches) < settings.steps:
        picked = [order[(position + i) % len(order)] for i in range(settings.batch_size)]
        position += settings.batch_size
        batches.append(collate([data.train[i] for i in picked]))
    return batches


# --- one run -----------------------------------------------------------------------------------
@dataclass
class Run:
    recipe: str
    seed: int
    trainable_params: int
    curve: list[tuple[int, float]]  # (steps taken, eval loss)
    strict: float
    flexible: float
    train_loss: float
    seconds: float
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


def adapter_config(recipe: Recipe, settings: Settings):
    """The recipe's adapter config; run-describing init options (lr, warmup_ratio, total_steps) are
    filled in from this run unless the recipe sets them."""
    from lorakit.core.registry import data_initialiser, method_spec

    values = dict(recipe.fields)
    spec = data_initialiser(recipe.init)
    if spec is not None:
        run = {"lr": recipe.lr * settings.lr_scale, "warmup_ratio": max(settings.warmup_steps, 1) / settings.steps,
               "total_steps": settings.steps}
        if settings.init_max_passes is not None:
            run["max_batches"] = settings.init_max_passes
        names = {f.name for f in fields(spec.options)}
        options = {k: v for k, v in run.items() if k in names}
        values["init_options"] = {**options, **values.get("init_options", {})}
    return method_spec(recipe.method).config_cls(**values)


class LisaHooks(families_bench.StepHooks):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: dict, seed: int):
        from lorakit.optim import LISA

        self.lisa, self.optimizer = LISA(model, seed=seed, **settings), optimizer

    def before(self, step: int) -> None:
        self.lisa.begin_step(step, self.optimizer)


def prepare_model(recipe: Recipe, base: nn.Module, batches, settings: Settings, seed: int) -> tuple[nn.Module, str]:
    """A fresh copy of `base` set up for `recipe`: (model, a description of the config)."""
    import lorakit

    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(settings.device)
    if recipe.method is None:  # full-parameter training
        for p in model.parameters():
            p.requires_grad_(True)
        return model, "full-parameter"
    from lorakit.core.registry import data_initialiser

    config = adapter_config(recipe, settings)
    init_data = None
    if data_initialiser(recipe.init) is not None:
        init_data = [{k: v.to(settings.device) for k, v in b.items()} for b in batches[: settings.init_batches]]
    lorakit.inject(model, config, data=init_data, progress=False)
    return model, families_bench._describe_config(config)


def run_recipe(recipe: Recipe, base: nn.Module, tokenizer, data: Data, batches, settings: Settings, seed: int,
               log: Callable[[str], None] = lambda line: None) -> Run:
    from transformers import get_cosine_schedule_with_warmup

    from lorakit.data.metrics import flexible_number_match, strict_number_match
    from lorakit.optim import build_optimizer
    from lorakit.train.evaluate import generate_responses, response_loss

    started = time.perf_counter()
    model, _ = prepare_model(recipe, base, batches, settings, seed)
    model.train()
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = recipe.lr * settings.lr_scale
    optimizer = build_optimizer(recipe.optimizer, model, lr, 0.0, recipe.optimizer_options)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    if recipe.lisa is not None:
        hooks = LisaHooks(model, optimizer, recipe.lisa, seed)
    elif recipe.method is not None:
        hooks = families_bench.step_hooks(families_bench.Family(recipe.label, recipe.method), model, optimizer, settings.steps)
    else:
        hooks = families_bench.StepHooks()

    def eval_loss() -> float:
        return response_loss(model, tokenizer, data.test, settings.max_length)

    curve, loss = [(0, eval_loss())], math.nan
    for step, batch in enumerate(batches):
        batch = {k: v.to(settings.device) for k, v in batch.items()}
        hooks.before(step)
        if step == 0 and recipe.lisa is not None:  # trainable at one time: always-on + the active blocks
            count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loss = step_bench.train_step(model, optimizer, batch).item()
        hooks.after(step)
        schedule.step()
        if not math.isfinite(loss):
            log(f"    {recipe.label} seed {seed}: training loss {loss} at step {step + 1}; stopping this run")
            curve.append((step + 1, math.nan))
            break
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            curve.append((step + 1, eval_loss()))
            log(f"    {recipe.label} seed {seed} step {step + 1}: train loss {loss:.3f}, eval loss {curve[-1][1]:.3f}")
    predictions = generate_responses(model, tokenizer, data.test, settings.max_new_tokens)
    strict = [strict_number_match(p, r) for p, r in zip(predictions, data.references)]
    flexible = [flexible_number_match(p, r) for p, r in zip(predictions, data.references)]
    samples = [{"question": e.messages[-1]["content"], "reference": r, "prediction": p}
               for e, r, p in list(zip(data.test, data.references, predictions))[:3]]
    return Run(recipe.key, seed, count, curve, sum(strict) / len(strict), sum(flexible) / len(flexible), loss,
               time.perf_counter() - started, samples)


def base_scores(base: nn.Module, tokenizer, data: Data, settings: Settings) -> dict[str, float]:
    """The untrained model's eval loss and accuracies (the row every recipe starts from)."""
    from lorakit.data.metrics import flexible_number_match, strict_number_match
    from lorakit.train.evaluate import generate_responses, response_loss

    base = base.to(settings.device)
    predictions = generate_responses(base, tokenizer, data.test, settings.max_new_tokens)
    return {
        "eval_loss": response_loss(base, tokenizer, data.test, settings.max_length),
        "strict": sum(map(strict_number_match, predictions, data.references)) / len(predictions),
        "flexible": sum(map(flexible_number_match, predictions, data.references)) / len(predictions),
    }


def measure(base: nn.Module, tokenizer, data: Data, recipes: list[Recipe], settings: Settings,
            log: Callable[[str], None] = lambda line: None) -> list[Run]:
    settings.validate()
    runs = []
    for seed in settings.seeds:
        batches = batches_for_seed(data, tokenizer, settings, seed)
        for recipe in recipes:
            run = run_recipe(recipe, base, tokenizer, data, batches, settings, seed, log)
            runs.append(run)
            log(f"  {recipe.label} seed {seed}: eval loss {run.final_loss:.3f}, strict {run.strict:.3f}, "
                f"flexible {run.flexible:.3f}, {run.trainable_params:,} trainable ({run.seconds:.0f} s)")
    return runs


# --- summary -----------------------------------------------------------------------------------
@dataclass
class Summary:
    recipe: Recipe
    runs: list[Run]

    def values(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.runs]

    def mean_curve(self) -> list[tuple[int, float]]:
        steps = [s for s, _ in self.runs[0].curve]
        curves = [dict(r.curve) for r in self.runs]
        return [(s, statistics.fmean(c.get(s, math.nan) for c in curves)) for s in steps]

    def steps_to_reach(self, target: float) -> int | None:
        for step, loss in self.mean_curve()[1:]:
            if loss <= target:
                return step
        return None


def summarise(runs: list[Run], recipes: list[Recipe]) -> list[Summary]:
    return [Summary(r, [run for run in runs if run.recipe == r.key]) for r in recipes]


def _mean_std(values: list[float], digits: int = 3) -> str:
    if any(not math.isfinite(v) for v in values):
        return "diverged"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


HEADER = ["method", "lr", "trainable params", "eval loss", "strict acc", "flexible acc",
          "steps to LoRA's final eval loss", "s / run"]


def rows(summaries: list[Summary]) -> list[list[str]]:
    baseline = next(s for s in summaries if s.recipe.key == BASELINE)
    target = statistics.fmean(baseline.values("final_loss"))
    out = []
    for s in summaries:
        reached = s.steps_to_reach(target) if math.isfinite(target) else None
        out.append([
            s.recipe.label, f"{s.recipe.lr:g}", f"{s.runs[0].trainable_params:,}", _mean_std(s.values("final_loss")),
            _mean_std(s.values("strict")), _mean_std(s.values("flexible")),
            str(reached) if reached is not None else "not reached", f"{statistics.fmean(s.values('seconds')):.0f}",
        ])
    return out


def plot(summaries: list[Summary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11.5, 5.5))
    baseline = next(s for s in summaries if s.recipe.key == BASELINE)
    colours, dashes = plt.get_cmap("tab20").colors, ("-", "--", ":", "-.")
    for index, s in enumerate(summaries):  # 20 colours x 4 line styles: every recipe tells apart
        curve = s.mean_curve()
        steps = [step for step, _ in curve]
        line, = ax.plot(steps, [loss for _, loss in curve], marker="o", markersize=3, label=s.recipe.label,
                        linewidth=2.2 if s is baseline else 1.2, color="black" if s is baseline else colours[index % 20],
                        linestyle="-" if s is baseline else dashes[(index // 20) % 4])
        if len(s.runs) > 1:
            per_step = [[dict(r.curve).get(step, math.nan) for r in s.runs] for step in steps]
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                            alpha=0.15)
    ax.axhline(statistics.fmean(baseline.values("final_loss")), color="gray", linestyle="--", linewidth=0.8,
               label="LoRA final")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("eval loss (cross-entropy per answer token, GSM8K test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=1 if len(summaries) < 12 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_markdown(summaries: list[Summary], base: dict[str, float], data: Data, settings: Settings,
                    env: dict[str, str], command: str, missing: dict[str, str], png_name: str,
                    extended: list[str] = ()) -> str:
    s = settings
    lines = [
        *step_bench.results_head(
            "# Convergence on GSM8K: initialisers, optimisers, LISA and adapter families against LoRA", command),
        f"Default model fine-tuned on GSM8K train ({len(data.train)} examples that fit in {s.max_length} tokens used; "
        f"{data.dropped_train} longer ones skipped), {s.steps} steps, batch {s.batch_size}, {s.warmup_steps} warm-up "
        f"steps then cosine decay, no weight decay, identical batches for every method per seed; seeds "
        f"{', '.join(map(str, s.seeds))}. Data-driven initialisers see the first {s.init_batches} training batches"
        f"{'' if s.init_max_passes is None else f' (cycled for at most {s.init_max_passes} passes)'}. "
        f"Evaluation on the first {len(data.test)} GSM8K test examples that fit ({data.dropped_test} skipped): eval "
        f"loss = cross-entropy per answer token, every {s.eval_every} steps; accuracy of greedy generations "
        f"({s.max_new_tokens} new tokens) after training: strict = the number after the first '####' equals the "
        f"reference's, flexible = the last number in the generation does. Values are mean ± sample std over seeds. "
        f"Steps to LoRA's final eval loss: first evaluated step whose mean eval loss is <= LoRA's final mean "
        f"(resolution {s.eval_every} steps).",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        *(["Rows carried over from earlier runs of this benchmark (`--extend`):", "", *extended, ""] if extended else []),
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        f"| base model (no training) | | 0 | {base['eval_loss']:.3f} | {base['strict']:.3f} | {base['flexible']:.3f} | | |",
        *["| " + " | ".join(row) + " |" for row in rows(summaries)],
        "",
        f"![eval-loss curves]({png_name})",
        "",
        "Recipes (adapter config as injected; optimiser; notes):",
        "",
    ]
    for summary in summaries:
        r = summary.recipe
        what = f"{r.method}({', '.join(f'{k}={v}' for k, v in r.fields.items())})" if r.method else "no adapter"
        opt = r.optimizer + (f" {r.optimizer_options}" if r.optimizer_options else "")
        extra = f"; LISA {r.lisa}" if r.lisa else ""
        lines.append(f"- {r.label}: {what}; {opt}{extra}" + (f"; {r.note}" if r.note else ""))
    if missing:
        lines += ["", "Not run (not in lorakit yet): " + ", ".join(f"{k} (needs {v})" for k, v in missing.items()) + "."]
    return "\n".join(lines + [""])


def extend_from(paths: list[Path], settings: Settings, summaries: list[Summary]) -> tuple[list[Summary], list[str]]:
    """Recipes from earlier runs' JSON files (same settings) that this run did not train: (their
    summaries, one markdown line per file naming its command, its recipes and both LoRA results)."""
    names = {f.name for f in fields(Settings)}
    ours = json.loads(json.dumps(asdict(settings)))
    have = {s.recipe.key for s in summaries}
    lora = statistics.fmean(summaries[0].values("final_loss"))
    added, lines = [], []
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text())
            given = {k: v for k, v in earlier["settings"].items() if k in names}
            theirs = json.loads(json.dumps(asdict(Settings(**{**given, "seeds": tuple(given.get("seeds", (0, 1, 2)))}))))
            recipes = earlier["recipes"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SystemExit(f"--extend {path}: not a results JSON of bench/convergence.py ({error})")
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        if differ:
            raise SystemExit(f"--extend {path}: its run used other settings ("
                             + ", ".join(f"{k} {theirs[k]}, here {ours[k]}" for k in differ) + "); rerun with the same flags")
        taken = []
        for entry in recipes:
            recipe = Recipe(**entry["recipe"])
            if recipe.key in have:
                continue
            runs = [Run(**{**r, "curve": [tuple(point) for point in r["curve"]]}) for r in entry["runs"]]
            added.append(Summary(recipe, runs))
            have.add(recipe.key)
            taken.append(recipe.label)
        their_lora = next((statistics.fmean(r["curve"][-1][1] for r in e["runs"]) for e in recipes
                           if e["recipe"]["key"] == BASELINE), math.nan)
        lines.append(f"- {', '.join(taken) or 'no recipe'} from `{earlier.get('command', path)}` (same settings; "
                     f"LoRA's final eval loss there {their_lora:.3f}, here {lora:.3f})")
    return added, lines


def to_json(summaries: list[Summary], base: dict[str, float], settings: Settings, command: str) -> str:
    return json.dumps({
        "command": command, "settings": asdict(settings), "base": base,
        "recipes": [{"recipe": asdict(s.recipe), "runs": [asdict(r) for r in s.runs]} for s in summaries],
    }, indent=1, default=str)


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"GSM8K folder with train/test.jsonl [{DEFAULT_DATA}]")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda'")
    parser.add_argument("--steps", type=int, default=None, help=f"[{d.steps}]")
    parser.add_argument("--batch-size", type=int, default=None, help=f"[{d.batch_size}]")
    parser.add_argument("--max-length", type=int, default=None, help=f"[{d.max_length}]")
    parser.add_argument("--seeds", default=None, help=f"comma-separated [{','.join(map(str, d.seeds))}]")
    parser.add_argument("--eval-every", type=int, default=None, help=f"[{d.eval_every}]")
    parser.add_argument("--eval-examples", type=int, default=None, help=f"[{d.eval_examples}]")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"[{d.max_new_tokens}]")
    parser.add_argument("--init-batches", type=int, default=None,
                        help=f"training batches the data-driven initialisers see [{d.init_batches}]")
    parser.add_argument("--init-max-passes", type=int, default=None,
                        help="most forward passes EVA may cycle them for [EVA's own cap, 1000]")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply every recipe's learning rate")
    parser.add_argument("--only", default=None, help="comma-separated recipe keys (LoRA always runs); see RECIPES")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="reduced run (< 10 min on 2 CPU cores), every recipe: "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/convergence_<device>[_quick].md)")
    parser.add_argument("--extend", type=Path, nargs="+", default=None, metavar="JSON",
                        help="add the recipes of earlier runs' .json results (same settings) that this run does not "
                             "train to its table and plot, e.g. to grow a long run a few recipes at a time")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    chosen = dict(QUICK) if args.quick else {}
    for key in ("steps", "batch_size", "max_length", "eval_every", "eval_examples", "max_new_tokens", "init_batches",
                "init_max_passes"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if args.seeds:
        chosen["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if "steps" in chosen and "warmup_steps" not in chosen:
        chosen["warmup_steps"] = min(Settings.warmup_steps, chosen["steps"] - 1)
    return Settings(device=device, lr_scale=args.lr_scale, **chosen)


def main(argv: list[str] | None = None) -> list[Summary]:
    import lorakit.models

    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    settings.validate()
    recipes, missing = select_recipes(args.only)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/convergence.py", *given])
    env = step_bench.environment(step_bench.Settings(device=settings.device))
    env.pop("peft", None)
    print("convergence benchmark on GSM8K (every recipe vs LoRA, same batches and schedule)")
    for key, value in env.items():
        print(f"  {key}: {value}")
    if missing:
        print("  not run (not in lorakit yet): " + ", ".join(f"{k} ({v})" for k, v in missing.items()))
    base, tokenizer = lorakit.models.load()
    data = load_data(args.data, tokenizer, settings)
    base_row = base_scores(base, tokenizer, data, settings)
    print(f"  base model: eval loss {base_row['eval_loss']:.3f}, strict {base_row['strict']:.3f}, "
          f"flexible {base_row['flexible']:.3f}", flush=True)
    runs = measure(base, tokenizer, data, recipes, settings, log=lambda line: print(line, flush=True))
    summaries = summarise(runs, recipes)
    carried, extended = extend_from(args.extend, settings, summaries) if args.extend else ([], [])
    summaries += carried
    out = args.out or REPO_ROOT / "bench" / "results" / (
        f"convergence_{torch.device(settings.device).type}{'_quick' if args.quick else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    env["wall time (whole command)"] = f"{time.perf_counter() - started:.0f} s"
    env["process CPU time (all threads)"] = f"{time.process_time():.0f} s"
    env["load average at the end"] = step_bench._load_average()
    png = out.with_suffix(".png")
    plot(summaries, png, f"GSM8K eval loss, {settings.steps} steps, batch {settings.batch_size}, "
                         f"{len(settings.seeds)} seed(s)")
    out.write_text(format_markdown(summaries, base_row, data, settings, env, command, missing, png.name, extended))
    out.with_suffix(".json").write_text(to_json(summaries, base_row, settings, command))
    table = [HEADER] + rows(summaries)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    print()
    for row in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(f"\nwrote {out}, {png.name}, {out.with_suffix('.json').name} ({env['wall time (whole command)']})")
    return summaries


if __name__ == "__main__":
    main()
