"""Merged LoRA adapters vs the adapters they came from, per task, on the default model.

One LoRA (r=8, alpha=16, all linear layers; --quick: q_proj and v_proj) is trained per task with AdamW on the same base model
(SmolLM2-135M-Instruct unless --model), then the task adapters are merged with every method of
`lorakit.merge_adapters` at its defaults (weights 1/N for linear/cat/svd/dare, 1 for ties/lego;
see `lorakit.merge`), and each adapter is scored on a held-out subset of every task by greedy
exact match (`lorakit.data.exact_match`; GSM8K by its final number, `flexible_number_match`).

Tasks: "default" (lorakit's built-in task), "sst2" and "rte" (GLUE TSVs, as prompt -> label word:
positive/negative, yes/no), "gsm8k" (question -> worked answer; slow to generate on a CPU).
Data are read from ../shared/data (or --data-root) and never copied.

    .venv/bin/python bench/merge.py --quick            # 3 tasks, q/v LoRAs, 40 steps, 32 held-out examples each
    .venv/bin/python bench/merge.py --tasks default,sst2,rte,gsm8k --steps 200 --eval-examples 200

Writes a markdown table (rows: base, each task adapter, each merge; columns: tasks and their mean)
with the command and timings to bench/results/merge_<device>[_quick].md.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

import lorakit  # noqa: E402
from lorakit.data import DataCollator, encode, exact_match, load_records, to_example  # noqa: E402
from lorakit.data.metrics import flexible_number_match  # noqa: E402
from lorakit.train.evaluate import generate_responses  # noqa: E402

DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
METHODS = ("linear", "cat", "svd", "ties", "dare", "lego")
SST2_PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {}"
RTE_PROMPT = ("Does the first sentence imply the second? Answer yes or no.\n\n"
              "First: {}\nSecond: {}")


def task_records(task: str, root: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records {"prompt", "response"} of one task; held-out shuffled by `seed`."""
    if task == "default":
        return lorakit.data.default_task(seed=seed)
    if task == "sst2":
        convert = lambda r: {"prompt": SST2_PROMPT.format(r["sentence"].strip()),  # noqa: E731
                             "response": "positive" if r["label"] == "1" else "negative"}
        train, held = load_records(root / "sst2", "train"), load_records(root / "sst2", "dev")
    elif task == "rte":
        convert = lambda r: {"prompt": RTE_PROMPT.format(r["sentence1"].strip(), r["sentence2"].strip()),  # noqa: E731
                             "response": "yes" if r["label"] == "entailment" else "no"}
        train, held = load_records(root / "rte", "train"), load_records(root / "rte", "dev")
    elif task == "gsm8k":
        convert = lambda r: {"prompt": r["question"], "response": r["answer"]}  # noqa: E731
        train, held = load_records(root / "gsm8k", "train"), load_records(root / "gsm8k", "test")
    else:
        raise SystemExit(f"unknown task {task!r}; choose from default, sst2, rte, gsm8k")
    train, held = [convert(r) for r in train], [convert(r) for r in held]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def train_adapter(model, tokenizer, records: list[dict], out: Path, args) -> float:
    """Train a fresh LoRA on `records` for args.steps AdamW steps, save it to `out`; returns seconds."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    lorakit.inject(model, lorakit.LoraConfig(r=args.rank, alpha=2.0 * args.rank, target_modules=targets), progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    collate = DataCollator.from_tokenizer(tokenizer)
    encoded = [encode(tokenizer, to_example(r), args.max_length) for r in records[: args.steps * args.batch_size]]
    device = next(model.parameters()).device
    model.train()
    for step in range(args.steps):
        chunk = encoded[(step * args.batch_size) % len(encoded):][: args.batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"    step {step + 1}/{args.steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    lorakit.save_adapter(model, out)
    lorakit.delete_adapter(model, "default")
    return time.perf_counter() - start


def score(model, tokenizer, task: str, held: list[dict], args) -> float:
    examples = [to_example(r) for r in held[: args.eval_examples]]
    new_tokens = 256 if task == "gsm8k" else 16 if task == "default" else 4
    predictions = generate_responses(model, tokenizer, examples, new_tokens, batch_size=args.eval_batch_size)
    match = flexible_number_match if task == "gsm8k" else exact_match
    return sum(match(p, e.response) for p, e in zip(predictions, examples)) / len(examples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 tasks, q/v LoRAs, 40 steps, 32 held-out examples, 1 thread (minutes on a CPU)")
    parser.add_argument("--tasks", default="default,sst2,rte")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="all-linear", help="LoRA target_modules: 'all-linear' or comma-separated names")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (--quick: 1; multi-threaded LAPACK "
                        "thrashes on a shared CPU: an SVD took 18 s with 2 threads vs 0.3 s with 1 on the busy 2-core box)")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--work-dir", type=Path, help="keep the adapters here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="markdown file (default: bench/results/merge_<device>[_quick].md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_examples, args.max_length, args.targets = 40, 32, 160, "q_proj,v_proj"
        args.threads = args.threads or (1 if not torch.cuda.is_available() else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    command = "python bench/merge.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"setup: {command}\n  tasks {tasks}, methods {methods}, LoRA r={args.rank} alpha={2 * args.rank}, "
          f"targets {args.targets}, {args.steps} steps x batch {args.batch_size}, lr {args.lr}, {args.eval_examples} held-out examples/task, "
          f"device {device}, torch threads {torch.get_num_threads()}", flush=True)

    started = time.perf_counter()
    model, tokenizer = lorakit.models.load(args.model)
    model.to(device)
    data = {task: task_records(task, args.data_root, args.seed) for task in tasks}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lorakit-merge-bench-"))
    timings: dict[str, float] = {}

    adapters: dict[str, Path | None] = {"base model": None}
    for task in tasks:
        print(f"training the {task} adapter", flush=True)
        adapters[f"{task} adapter"] = work / f"adapter-{task}"
        timings[f"train {task}"] = train_adapter(model, tokenizer, data[task][0], work / f"adapter-{task}", args)
    task_dirs = [work / f"adapter-{task}" for task in tasks]
    merged_info = {}
    for method in methods:
        start = time.perf_counter()
        report = lorakit.merge_adapters(task_dirs, method, None, work / f"merged-{method}", force=True)
        timings[f"merge {method}"] = time.perf_counter() - start
        ranks = sorted({layer["rank"] for layer in report.layers.values()})
        distance = max(layer["distance_from_sum"] for layer in report.layers.values())
        merged_info[method] = (report.weights, ranks, distance)
        adapters[f"merged: {method}"] = work / f"merged-{method}"
        print(f"merged with {method}: ranks {ranks}, max distance from the weighted sum {distance:.3f}", flush=True)

    scores: dict[str, dict[str, float]] = {}
    for label, folder in adapters.items():
        if folder is not None:
            lorakit.load_adapter(model, folder)
        scores[label] = {task: score(model, tokenizer, task, data[task][1], args) for task in tasks}
        if folder is not None:
            lorakit.delete_adapter(model, "default")
        print(f"{label:<18} " + "  ".join(f"{t} {s:.3f}" for t, s in scores[label].items()), flush=True)
    total = time.perf_counter() - started

    lines = [
        "# Merging task adapters: each task's exact match, merged vs individual adapters", "",
        f"Command: `{command}` ({total:.0f} s wall, device {device}, torch threads {torch.get_num_threads()}).", "",
        f"Base model {args.model or lorakit.models.DEFAULT_MODEL}; one LoRA per task (r={args.rank}, alpha={2 * args.rank}, "
        f"targets {args.targets}, {args.steps} AdamW steps x batch {args.batch_size}, lr {args.lr}); merges at each method's "
        f"defaults; greedy exact match on {args.eval_examples} held-out examples per task (GSM8K: final number).", "",
        "| adapter | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for label, row in scores.items():
        mean = sum(row.values()) / len(row)
        lines.append(f"| {label} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + f" | {mean:.3f} |")
    lines += ["", "| merge | weights | ranks written | max relative distance from the weighted sum | time (s) |",
              "|---|---|---|---:|---:|"]
    for method, (weights, ranks, distance) in merged_info.items():
        lines.append(f"| {method} | {', '.join(f'{w:.3g}' for w in weights)} | {ranks} | {distance:.3f} | "
                     f"{timings[f'merge {method}']:.1f} |")
    lines += ["", "Training time per adapter (s): " + ", ".join(f"{t}: {timings[f'train {t}']:.0f}" for t in tasks), ""]
    out = args.out or REPO_ROOT / "bench" / "results" / f"merge_{device}{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
