"""Intruder dimensions after LoRA r=1, LoRA r=8, rsLoRA r=64 and full fine-tuning, one run.

Shuttleworth et al. (arXiv 2410.21228) report that low-rank LoRA leaves "intruder dimensions" in
the fine-tuned weights (top singular vectors of W0 + dW nearly orthogonal to every singular vector
of W0) while full fine-tuning leaves very few, and that high-rank rsLoRA behaves like full
fine-tuning. This script checks that ordering on the default model and the built-in default task:
the same layer subset (every Linear of a few decoder layers) is trained by each method for the
same AdamW steps on the same batches, then `lorakit.analysis` counts intruders per method (top-10
singular vectors, threshold 0.5, the paper's defaults) and, as the paper plots, over a sweep of
thresholds. Also reported: held-out loss (the paper compares methods at equal task accuracy),
mean effective rank of dW and mean ||dW||_2 / ||W0||_2.

Scales (alpha): LoRA alpha = 2r (s = 2, the paper's setting); rsLoRA r=64 alpha=16 (s = 16/sqrt(64)
= 2). Learning rates: 2e-3 for the adapters (lorakit's default-task rate), 2e-4 for full
fine-tuning (a tenth, the usual ratio); `--lr` / `--full-lr` change them.

    .venv/bin/python bench/intruders.py --quick     # minutes on CPU
    .venv/bin/python bench/intruders.py             # longer training, more layers
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families as families_bench  # noqa: E402  (the shared training batches)
import train_step as step_bench  # noqa: E402  (the shared step and environment)

REPO_ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Method:
    label: str
    config: dict | None  # LoraConfig fields; None = full fine-tuning of the same layers


METHODS = [
    Method("LoRA r=1", {"r": 1, "alpha": 2.0}),
    Method("LoRA r=8", {"r": 8, "alpha": 16.0}),
    Method("rsLoRA r=64", {"r": 64, "alpha": 16.0, "use_rslora": True}),
    Method("full FT", None),
]


@dataclass
class Settings:
    steps: int = 200
    batch_size: int = 8
    max_length: int = 96
    layers: tuple[int, ...] = (4, 12, 20, 28)
    lr: float = 2e-3
    full_lr: float = 2e-4
    warmup_steps: int = 10
    eval_examples: int = 50
    seed: int = 0
    device: str = "cpu"


@dataclass
class MethodResult:
    method: Method
    trainable_params: int
    train_seconds: float
    eval_loss: float
    intruders: int  # at threshold 0.5, top-10
    layers_with_intruders: int
    sweep: dict[float, int]  # threshold -> intruders
    mean_effective_rank: float
    mean_relative_norm: float
    per_layer: dict[str, list[int]] = field(default_factory=dict)


def _target_paths(model: nn.Module, layers: tuple[int, ...]) -> list[str]:
    from lorakit.core.inject import find_targets

    return find_targets(model, rf".*\.layers\.({'|'.join(map(str, layers))})\.(self_attn|mlp)\.\w+_proj")


def _updates(method: Method, model: nn.Module, base: nn.Module,
             paths: list[str]) -> list[tuple[str, torch.Tensor, torch.Tensor, int | None]]:
    """(path, W0, W0 + dW, rank) per trained layer."""
    out = []
    with torch.no_grad():
        for path in paths:
            W0 = base.get_submodule(path).weight.detach().double().cpu()
            if method.config is None:
                out.append((path, W0, model.get_submodule(path).weight.detach().double().cpu(), None))
            else:
                layer = model.get_submodule(path)
                adapter = layer.adapters["default"]
                delta = adapter.delta_weight(layer.weight_out_in()).double().cpu()
                out.append((path, W0, W0 + delta, adapter.r))
    return out


def run_method(method: Method, base: nn.Module, tokenizer, batches, eval_examples, settings: Settings) -> MethodResult:
    import lorakit
    from lorakit.analysis import analyse_layer
    from lorakit.train.evaluate import response_loss
    from transformers import get_cosine_schedule_with_warmup

    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(base)
    paths = _target_paths(model, settings.layers)
    if method.config is None:
        for param in model.parameters():
            param.requires_grad_(False)
        for path in paths:
            model.get_submodule(path).weight.requires_grad_(True)
        lr = settings.full_lr
    else:
        lorakit.inject(model, lorakit.LoraConfig(target_modules=paths, **method.config))
        lr = settings.lr
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    started = time.perf_counter()
    for batch in batches:
        step_bench.train_step(model, optimizer, {k: v.to(device) for k, v in batch.items()})
        schedule.step()
    train_seconds = time.perf_counter() - started
    model.eval()
    eval_loss = response_loss(model, tokenizer, eval_examples, settings.max_length)
    sweep = {threshold: 0 for threshold in THRESHOLDS}
    per_layer, ranks, norms = {}, [], []
    for path, W0, tuned, rank in _updates(method, model, base, paths):
        layer = analyse_layer(path, W0, tuned, rank)
        similarity = torch.tensor(layer.similarities)  # c_j of the top-10 singular vectors
        for threshold in THRESHOLDS:
            sweep[threshold] += int((similarity < threshold).sum())
        per_layer[path] = layer.intruders
        ranks.append(layer.effective_rank)
        norms.append(layer.relative_spectral_norm)
    return MethodResult(method, sum(p.numel() for p in trainable), train_seconds, eval_loss,
                        intruders=sum(len(v) for v in per_layer.values()),
                        layers_with_intruders=sum(bool(v) for v in per_layer.values()), sweep=sweep,
                        mean_effective_rank=statistics.mean(ranks), mean_relative_norm=statistics.mean(norms),
                        per_layer=per_layer)


def measure(settings: Settings, log=print) -> tuple[float, list[MethodResult], int]:
    import lorakit.models
    from lorakit.data import default_task, to_example
    from lorakit.train.evaluate import response_loss

    base, tokenizer = lorakit.models.load()
    train_records, eval_records = default_task(seed=settings.seed)
    batches = families_bench.training_batches(tokenizer, [to_example(r) for r in train_records], settings)
    eval_examples = [to_example(r) for r in eval_records][: settings.eval_examples]
    base_loss = response_loss(base.to(settings.device), tokenizer, eval_examples, settings.max_length)
    matrices = len(_target_paths(base, settings.layers))
    log(f"  base model eval loss {base_loss:.3f}; {matrices} matrices trained (decoder layers {list(settings.layers)})")
    results = []
    for method in METHODS:
        started = time.perf_counter()
        result = run_method(method, base, tokenizer, batches, eval_examples, settings)
        results.append(result)
        log(f"  {method.label}: {result.intruders} intruders in {result.layers_with_intruders} layers, "
            f"eval loss {result.eval_loss:.3f}, mean eff. rank {result.mean_effective_rank:.1f} "
            f"({time.perf_counter() - started:.0f} s)")
    return base_loss, results, matrices


HEADER = ["method", "trainable params", "lr", "eval loss", "intruders (k=10, eps=0.5)", "layers with any",
          *[f"eps={t}" for t in THRESHOLDS], "mean eff. rank of dW", "mean sigma1(dW)/sigma1(W0)", "train (s)"]


def rows(results: list[MethodResult], settings: Settings) -> list[list[str]]:
    return [[r.method.label, f"{r.trainable_params:,}", f"{settings.full_lr if r.method.config is None else settings.lr:g}",
             f"{r.eval_loss:.3f}", str(r.intruders), str(r.layers_with_intruders),
             *[str(r.sweep[t]) for t in THRESHOLDS], f"{r.mean_effective_rank:.1f}", f"{r.mean_relative_norm:.3f}",
             f"{r.train_seconds:.0f}"] for r in results]


def ordering_verdict(results: list[MethodResult]) -> str:
    counts = {r.method.label: r.intruders for r in results}
    low = min(counts["LoRA r=1"], counts["LoRA r=8"])
    holds = low > counts["rsLoRA r=64"] and low > counts["full FT"]
    weak = counts["LoRA r=1"] >= counts["rsLoRA r=64"] and counts["LoRA r=1"] >= counts["full FT"]
    if holds:
        return "holds: both low-rank LoRAs have more intruders than rsLoRA r=64 and full fine-tuning"
    if weak and counts["LoRA r=1"] > 0:
        return ("holds only partly: LoRA r=1 has at least as many intruders as rsLoRA r=64 and full FT, "
                "but not both low ranks have more than both")
    return "does not show at this scale: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def format_markdown(base_loss, results, settings: Settings, matrices: int, env: dict[str, str], command: str,
                    wall_seconds: float) -> str:
    lines = [*step_bench.results_head("# Intruder dimensions: LoRA vs rsLoRA vs full fine-tuning", command),
             f"Default model, built-in default task; every Linear of decoder layers {list(settings.layers)} "
             f"({matrices} matrices) trained by each method for {settings.steps} AdamW steps (no weight decay, "
             f"{settings.warmup_steps} warm-up steps then cosine decay), batch {settings.batch_size}, max length "
             f"{settings.max_length}, identical batches (seed {settings.seed}). Intruders: top-10 singular vectors of "
             "W0 + dW whose max |cosine| with every singular vector of W0 is below eps (arXiv 2410.21228; "
             "`lorakit.analysis`), summed over the trained matrices; the eps columns are the paper's threshold sweep. "
             f"Eval loss: cross-entropy per response token on {settings.eval_examples} held-out prompts "
             f"(base model: {base_loss:.3f}). LoRA alpha = 2r; rsLoRA alpha = 16 (s = 2 for every adapter).", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- wall time of the whole run: {wall_seconds:.0f} s", ""]
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|---|" + "---:|" * (len(HEADER) - 1))
    lines += ["| " + " | ".join(row) + " |" for row in rows(results, settings)]
    lines += ["", f"Paper's ordering (low-rank LoRA has more intruders than rsLoRA r=64 / full FT): {ordering_verdict(results)}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: 40 steps, 2 decoder layers, batch 4")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--layers", help="comma-separated decoder layer indices (default 4,12,20,28)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--full-lr", type=float)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> list[MethodResult]:
    args = parse_args(argv)
    settings = Settings(device=args.device)
    if args.quick:
        settings = Settings(steps=40, batch_size=4, layers=(8, 20), warmup_steps=3, eval_examples=20, device=args.device)
    if args.steps:
        settings.steps = args.steps
    if args.layers:
        settings.layers = tuple(int(i) for i in args.layers.split(","))
    settings.lr = args.lr or settings.lr
    settings.full_lr = args.full_lr or settings.full_lr
    command = shlex.join(["python", "bench/intruders.py", *(sys.argv[1:] if argv is None else argv)])
    env = step_bench.environment(step_bench.Settings(device=settings.device))
    env.pop("peft", None)
    print("intruder dimensions benchmark (LoRA r=1, r=8, rsLoRA r=64, full FT; same layers, steps and batches)")
    for key, value in env.items():
        print(f"  {key}: {value}")
    started = time.perf_counter()
    base_loss, results, matrices = measure(settings)
    wall = time.perf_counter() - started
    text = format_markdown(base_loss, results, settings, matrices, env, command, wall)
    print()
    print(text)
    out = args.out or REPO_ROOT / "bench" / "results" / (
        f"intruders_{torch.device(settings.device).type}{'_quick' if args.quick else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
