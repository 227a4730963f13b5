"""LoRAPrune vs magnitude (and LLM-Pruner-style weight-gradient) pruning at the same ratio.

On the default model (SmolLM2-135M-Instruct), each criterion prunes the same fraction of every
layer's key/value groups and MLP channels with `lorakit.prune`, fine-tuning the same LoRA (r=8,
alpha=16) for the same steps on the same batches (the paper's criterion ablation); only the score
that picks the groups differs:

- lora:      LoRAPrune's |(G_B A + B G_A - G_B G_A) * (W + s B A)|   (LoRA gradients only);
- magnitude: |W + s B A|;
- grad:      |dL/dW * (W + s B A)|  (LLM-Pruner's first-order Taylor; needs every base-weight gradient);
- magnitude, one-shot: magnitude scores, no fine-tuning (reference).

Text: GSM8K as plain text (question + answer); training batches from the train split, perplexity on
the first answers of the test split (held out). Memory of the importance estimate: gradient bytes
held after a backward (measured by summing the `.grad` tensors; on CUDA also the allocator's peak of
the first step), the persistent score vectors and the largest per-module temporary.

    .venv/bin/python bench/prune.py --quick      # minutes on CPU
    .venv/bin/python bench/prune.py              # more steps and held-out text
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import IGNORE_INDEX
from lorakit.prune import perplexity

REPO_ROOT = Path(__file__).resolve().parents[1]
GSM8K = REPO_ROOT.parent / "shared" / "data" / "gsm8k"  # ../shared/data, read-only
MIB = 2**20


def text_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Plain causal-LM batches: loss on every real token, padding masked out."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, little held-out text (minutes on CPU)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, help="optimizer steps per criterion (default 12 quick, 200 full)")
    parser.add_argument("--prune-freq", type=int, help="default 3 quick, 10 full (the official value)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-texts", type=int, help="held-out answers scored (default 16 quick, 256 full)")
    parser.add_argument("--only", help="comma-separated subset of lora,magnitude,grad,magnitude-oneshot")
    parser.add_argument("--out", type=Path, help="markdown results file (default bench/results/prune_<device>[_quick].md)")
    args = parser.parse_args(argv)
    steps = args.steps or (12 if args.quick else 200)
    prune_freq = args.prune_freq or (3 if args.quick else 10)
    n_eval = args.eval_texts or (16 if args.quick else 256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()

    _, tokenizer = lorakit.models.load()
    train = read_jsonl(GSM8K / "train.jsonl", steps * args.batch_size)
    test = read_jsonl(GSM8K / "test.jsonl", n_eval)
    train_batches = text_batches(tokenizer, [f"{r['question']}\n{r['answer']}" for r in train], args.batch_size, args.max_length)
    eval_batches = text_batches(tokenizer, [r["answer"] for r in test], 8, args.max_length)
    eval_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in eval_batches)
    print(f"device {device}, ratio {args.ratio}, {steps} steps x batch {args.batch_size} (max {args.max_length} tokens), "
          f"prune_freq {prune_freq}, held-out: {n_eval} GSM8K test answers ({eval_tokens} tokens)", flush=True)

    base, _ = lorakit.models.load()
    base.to(device)
    base_ppl = perplexity(base, eval_batches)
    base_params = sum(p.numel() for p in base.parameters())
    print(f"unpruned perplexity {base_ppl:.3f}, {base_params:,} parameters", flush=True)
    del base

    runs = {
        "lora": dict(metric="lora", steps=steps),
        "magnitude": dict(metric="magnitude", steps=steps),
        "grad": dict(metric="grad", steps=steps),
        "magnitude-oneshot": dict(metric="magnitude", steps=0),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    rows = []
    for name, options in runs.items():
        model, _ = lorakit.models.load()
        model.to(device)
        t0 = time.perf_counter()
        report = lorakit.prune(model, args.ratio, data=train_batches if options["steps"] else None,
                               prune_freq=prune_freq, progress=False, **options).prune_report
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, eval_batches)
        memory = report["importance_memory"]
        rows.append((name, ppl, report["parameters_after"], seconds, memory))
        print(f"{name:>18}: perplexity {ppl:.3f}, {report['parameters_after']:,} parameters, {seconds:.0f}s, "
              f"gradients held {memory.get('gradient_bytes_held', 0) / MIB:.2f} MiB", flush=True)
        del model

    wall = time.perf_counter() - start
    command = "python bench/prune.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    by_name = {r[0]: r for r in rows}
    lines = [
        f"# LoRAPrune vs magnitude / weight-gradient pruning ({device}{', quick' if args.quick else ''})", "",
        f"Command: `{command}` (wall time {wall:.0f} s). Default model SmolLM2-135M-Instruct (fp32), "
        f"ratio {args.ratio} of every layer's KV groups and MLP channels, {steps} AdamW steps (LoRA r=8, alpha=16, lr 3e-4) "
        f"x batch {args.batch_size} of GSM8K train text (max {args.max_length} tokens), prune_freq {prune_freq}, "
        f"warmup/cooldown 0.1. Perplexity on {n_eval} held-out GSM8K test answers ({eval_tokens} tokens). "
        f"Unpruned perplexity {base_ppl:.3f} ({base_params:,} parameters).", "",
        "| criterion | perplexity | vs lora | parameters after | gradient bytes held (MiB) | score state (KiB) | largest temporary (KiB) | CUDA first-step peak (MiB) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lora_ppl = by_name["lora"][1] if "lora" in by_name else None
    for name, ppl, params, seconds, memory in rows:
        ratio = f"{ppl / lora_ppl:.2f}x" if lora_ppl else "-"
        held = memory.get("gradient_bytes_held")
        peak = memory.get("cuda_first_step_peak_bytes")
        lines.append(f"| {name} | {ppl:.3f} | {ratio} | {params:,} | {'-' if held is None else f'{held / MIB:.2f}'} | "
                     f"{memory['score_state_bytes'] / 1024:.1f} | {memory['estimate_transient_bytes'] / 1024:.0f} | "
                     f"{'-' if peak is None else f'{peak / MIB:.1f}'} | {seconds:.0f} |")
    if "lora" in by_name:
        memory = by_name["lora"][4]
        lines += ["", f"Gradient memory of the importance estimate: LoRAPrune needs only the LoRA gradients "
                  f"({memory['lora_gradient_bytes'] / MIB:.2f} MiB, which LoRA fine-tuning holds anyway); a weight-gradient "
                  f"(LLM-Pruner-style) estimate also holds dL/dW of every pruned projection "
                  f"({memory['weight_gradient_bytes'] / MIB:.1f} MiB fp32), "
                  f"{memory['weight_gradient_bytes'] / memory['lora_gradient_bytes']:.0f}x more."]
    out = args.out or REPO_ROOT / "bench" / "results" / f"prune_{device}{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
