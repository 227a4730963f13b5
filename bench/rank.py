"""Adaptive rank allocation on real data: uniform LoRA against IncreLoRA, AdaLoRA, DiffoRA, LaMDA++
and EVA's rank redistribution, at the same total rank, one run.

Every policy trains through `lorakit.train.train` — the code path of `lorakit train --rank-policy
NAME` — on the same SST-2 examples (../shared/data/sst2 next to the repository: train.tsv for
training, dev.tsv held out; the review -> "positive"/"negative" prompt of bench/merge.py), with the
same steps, batch, learning rate and schedule, targets (every linear layer of every decoder block)
and seed. The total rank is the same for all: `--rank` R on average over the M targeted modules,
R x M in all:

- uniform:   LoRA r = R everywhere;
- lamda++:   LoRA whose per-module ranks come from the weights' spectra (budget R x M);
- adalora:   SVD-form adapter from init_r = 1.5 R pruned to an average of R (cubic schedule over the
             middle 60% of the run: tinit = tfinal = 20% of the steps);
- increlora: every module starts at rank 1 and the top modules gain rank every interval until the
             average is R (rounds over 10%-60% of the run, top_h sized so the budget is reached);
- diffora:   LoRA r = 2 R on every module during the search (first 25% of the run), then the top
             half of the modules keep it (M/2 x 2R = R x M);
- eva:       LoRA r = R initialised by EVA with rho = 2, which moves rank between modules by
             explained variance and keeps the total.

Reported per policy: exact match and response loss on the held-out reviews, trainable parameters at
the end, seconds per step, the final rank of every module (as a heat map: decoder layer x module
type), and the spread of ranks. Written to bench/results/rank_<device>[_quick].md, .png and .json
(every module's final rank).

    .venv/bin/python bench/rank.py --quick     # < 10 min on 2 CPU cores
    .venv/bin/python bench/rank.py             # 300 steps, 200 held-out reviews
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge as merge_bench  # noqa: E402  (the SST-2 prompt and loader)
import train_step as step_bench  # noqa: E402  (the environment block)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POLICIES = ("uniform", "lamda++", "adalora", "increlora", "diffora", "eva")


@dataclass
class Settings:
    steps: int = 300
    batch_size: int = 8
    rank: int = 4
    lr: float = 1e-3
    max_length: int = 128
    eval_examples: int = 200
    train_examples: int = 4000
    seed: int = 0
    threads: int | None = None


QUICK = dict(steps=40, eval_examples=48, train_examples=400)


@dataclass
class Result:
    policy: str
    exact_match: float
    loss: float
    trainable: int
    seconds_per_step: float
    ranks: dict[str, int] = field(default_factory=dict)
    note: str = ""


def policy_recipe(policy: str, settings: Settings, modules: int) -> dict:
    """TrainConfig fields (method, adapter, rank_policy, rank_policy_options) for one policy."""
    r, steps = settings.rank, settings.steps
    lora = {"r": r, "alpha": 2.0 * r, "target_modules": "all-linear"}
    if policy == "uniform":
        return {"method": "lora", "adapter": lora}
    if policy == "lamda++":
        return {"method": "lora", "adapter": lora, "rank_policy": "lamda++"}
    if policy == "adalora":
        init_r = max(r + 1, round(1.5 * r))
        return {"method": "adalora", "rank_policy": "adalora",
                "adapter": {"init_r": init_r, "target_r": r, "alpha": 2.0 * init_r, "target_modules": "all-linear",
                            "tinit": steps // 5, "tfinal": steps // 5, "deltaT": max(1, steps // 20),
                            "total_step": steps}}
    if policy == "increlora":
        init_warmup, interval = max(1, steps // 10), max(1, steps // 20)
        rounds = max(1, (int(0.6 * steps) - init_warmup) // interval)
        incre = {2: 1, 4: 2, 6: 3, 8: 4}.get(r, 1)
        top_h = max(1, math.ceil((r - 1) * modules / (rounds * incre)))
        return {"method": "increlora", "rank_policy": "increlora",
                "adapter": {"init_r": 1, "target_r": r, "incre_rank_num": incre, "top_h": top_h,
                            "init_warmup": init_warmup, "incre_interval": interval, "alpha": 2.0 * r,
                            "target_modules": "all-linear"}}
    if policy == "diffora":
        return {"method": "lora", "adapter": {**lora, "r": 2 * r, "alpha": 4.0 * r}, "rank_policy": "diffora",
                "rank_policy_options": {"ratio": 0.5}}
    if policy == "eva":
        return {"method": "lora", "adapter": {**lora, "init": "eva",
                                              "init_options": {"rho": 2.0, "tau": 0.95, "max_batches": 32}}}
    raise SystemExit(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


def ranks_in_file(adapter_dir: Path) -> dict[str, int]:
    """{module path: rank} read from a saved adapter: rows of lora_A, or for the SVD-form adapters
    (AdaLoRA, IncreLoRA) the non-zero entries of lora_E."""
    ranks: dict[str, int] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as tensors:
        keys = list(tensors.keys())
        for key in keys:
            match = re.match(r"(?:base_model\.model\.)?(.*)\.lora_(A|E)(?:\.weight)?$", key)
            if not match:
                continue
            path, kind = match.groups()
            tensor = tensors.get_tensor(key)
            if kind == "E":
                ranks[path] = int((tensor != 0).sum())
            elif f"{match.group(0).rsplit('.lora_A', 1)[0]}.lora_E" not in keys:
                ranks[path] = int(tensor.shape[0])
    return ranks


def run_policy(policy: str, settings: Settings, data_dir: Path, run_root: Path) -> Result:
    import lorakit.models
    from lorakit.train import TrainConfig, train

    model, tokenizer = lorakit.models.load()
    modules = sum(1 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name)
    recipe = policy_recipe(policy, settings, modules)
    config = TrainConfig(
        data=str(data_dir / "train.jsonl"), eval_data=str(data_dir / "dev.jsonl"),
        prompt_field="prompt", response_field="response", output_dir=str(run_root / policy),
        max_steps=settings.steps, batch_size=settings.batch_size, learning_rate=settings.lr,
        warmup_steps=max(1, settings.steps // 10), lr_scheduler="linear", max_length=settings.max_length,
        eval_examples=settings.eval_examples, max_new_tokens=4, save_steps=0, seed=settings.seed,
        init_batches=4, logging_steps=max(1, settings.steps // 10), **recipe,
    )
    print(f"== {policy}: {json.dumps(recipe)}", flush=True)
    metrics = train(config, progress=False, model=model, tokenizer=tokenizer)
    ranks = ranks_in_file(run_root / policy / "adapter")
    steps = metrics["train"]["steps"] or settings.steps
    result = Result(policy, metrics["after"]["exact_match"], metrics["after"]["loss"],
                    sum(p.numel() for p in model.parameters() if p.requires_grad),
                    (metrics["train"]["seconds"] or 0.0) / steps, ranks)
    print(f"   exact match {result.exact_match:.3f}, loss {result.loss:.3f}, total rank {sum(ranks.values())}, "
          f"{result.seconds_per_step:.2f} s/step", flush=True)
    return result


def write_data(settings: Settings, folder: Path) -> None:
    train, held = merge_bench.task_records("sst2", merge_bench.DATA_ROOT, settings.seed)
    for name, records in (("train", train[: settings.train_examples]), ("dev", held[: settings.eval_examples])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def layer_of(path: str) -> int | None:
    match = re.search(r"layers\.(\d+)\.", path)
    return int(match.group(1)) if match else None


def heat_grid(ranks: dict[str, int], layers: int) -> list[list[float]]:
    """ranks as a (decoder layer x module type) grid; modules without an adapter are 0."""
    grid = [[0.0] * len(MODULE_TYPES) for _ in range(layers)]
    for path, rank in ranks.items():
        layer, kind = layer_of(path), path.rsplit(".", 1)[-1]
        if layer is not None and layer < layers and kind in MODULE_TYPES:
            grid[layer][MODULE_TYPES.index(kind)] = rank
    return grid


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(2.2 * len(results), 6), sharey=True)
    axes = [axes] if len(results) == 1 else list(axes)
    top = max((max(r.ranks.values(), default=0) for r in results), default=1)
    layers = 1 + max((layer_of(p) or 0 for r in results for p in r.ranks), default=0)
    for ax, result in zip(axes, results):
        image = ax.imshow(heat_grid(result.ranks, layers), aspect="auto", cmap="viridis", vmin=0, vmax=top, origin="lower")
        ax.set_title(f"{result.policy}\nEM {result.exact_match:.2f}", fontsize=9)
        ax.set_xticks(range(len(MODULE_TYPES)), [t.split("_")[0] for t in MODULE_TYPES], rotation=90, fontsize=7)
    axes[0].set_ylabel("decoder layer")
    fig.colorbar(image, ax=axes, shrink=0.6, label="final rank")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def format_markdown(results: list[Result], settings: Settings, env: dict[str, str], command: str, wall: float,
                    png_name: str) -> str:
    lines = [
        *step_bench.results_head(
            "# Adaptive rank allocation: the same total rank, allocated by each policy", command),
        f"Default model, SST-2 (train.tsv: {settings.train_examples} reviews; dev.tsv: first "
        f"{settings.eval_examples} held out), {settings.steps} steps x batch {settings.batch_size}, lr {settings.lr} "
        f"(linear schedule, 10% warm-up), every linear layer of every decoder block, average rank "
        f"{settings.rank}. Exact match of the greedy answer word; loss = cross-entropy per answer token.",
        "", *[f"- {k}: {v}" for k, v in env.items()], f"- wall time (whole command): {wall:.0f} s", "",
        "| policy | exact match | eval loss | total rank | modules with rank > 0 | rank min / median / max | trainable params (end) | s / step |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        values = list(r.ranks.values()) or [0]
        lines.append(
            f"| {r.policy} | {r.exact_match:.3f} | {r.loss:.3f} | {sum(values)} | {sum(v > 0 for v in values)} | "
            f"{min(values)} / {statistics.median(values):g} / {max(values)} | {r.trainable:,} | {r.seconds_per_step:.2f} |")
    lines += ["", f"![final ranks: decoder layer x module type]({png_name})", ""]
    by_type = ["| policy | " + " | ".join(MODULE_TYPES) + " |", "|---|" + "---:|" * len(MODULE_TYPES)]
    for r in results:
        totals = [sum(v for p, v in r.ranks.items() if p.endswith(t)) for t in MODULE_TYPES]
        by_type.append(f"| {r.policy} | " + " | ".join(map(str, totals)) + " |")
    lines += ["Total rank per module type:", "", *by_type, ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    d = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (< 10 min on 2 CPU cores): "
                        + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--only", default=None, help=f"comma-separated policies [{','.join(POLICIES)}]")
    for name in ("steps", "batch_size", "rank", "eval_examples", "train_examples", "seed", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"[{getattr(d, name)}]")
    parser.add_argument("--lr", type=float, default=None, help=f"[{d.lr}]")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/results/rank_<device>[_quick].md)")
    return parser.parse_args(argv)


def main(argv=None) -> list[Result]:
    started = time.perf_counter()
    args = parse_args(argv)
    chosen = dict(QUICK) if args.quick else {}
    for name in ("steps", "batch_size", "rank", "eval_examples", "train_examples", "seed", "threads", "lr"):
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    settings = Settings(**chosen)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    policies = [p.strip() for p in args.only.split(",")] if args.only else list(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"--only names unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or REPO_ROOT / "bench" / "results" / f"rank_{device}{'_quick' if args.quick else ''}.md"
    env = step_bench.environment(step_bench.Settings(device=device))
    env.pop("peft", None)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/rank.py", *given])
    results = []
    with tempfile.TemporaryDirectory(prefix="lorakit-rank-") as tmp:
        data_dir = Path(tmp)
        write_data(settings, data_dir)
        for policy in policies:
            results.append(run_policy(policy, settings, data_dir, data_dir / "runs"))
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(results, png)
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    text = format_markdown(results, settings, env, command, time.perf_counter() - started, png.name)
    out.write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
