"""Perplexity of weight-only quantization on the default model: round-to-nearest (RTN) vs CBQ, same bits and
group size, one run.

Held-out text: the answers of the first `--eval` GSM8K test records (plain text, each cut to 256 tokens),
scored as exp(mean next-token cross-entropy) over all their tokens. Calibration for CBQ: `--samples` GSM8K
train records (chat prompt + answer, cut to `--max-length` tokens, seed 0), one record per Adam step,
`--epochs` passes per window (`lorakit.quantize(..., method="cbq")`, library defaults otherwise). Both
methods quantize every Linear of the 30 decoder blocks (embeddings and head stay fp32). Printed and
written to bench/results/quant_<device>[_quick].md: full-precision perplexity, then per bit width RTN and
CBQ perplexity, their ratio, and the wall time of each quantization.

    .venv/bin/python bench/quant.py --quick   # W4 g128; 4 calibration records x 64 tokens, 2 epochs, 32 eval answers
    .venv/bin/python bench/quant.py           # W4, W3, W2 g128; 16 x 128 tokens, 4 epochs, 128 eval answers
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.data import load_records
from lorakit.quant import calibration_batches, perplexity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared/data, read-only


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--eval", type=int)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    quick = dict(bits=[4], samples=4, max_length=64, epochs=2, eval=32)
    full = dict(bits=[4, 3, 2], samples=16, max_length=128, epochs=4, eval=128)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    base, tokenizer = lorakit.models.load(None)
    base.to(args.device)
    texts = [r["answer"] for r in load_records(str(args.data), split="test")[: args.eval]]
    calibration = [{k: v.to(args.device) for k, v in b.items()}
                   for b in calibration_batches(tokenizer, load_records(str(args.data), split="train"), args.samples, args.max_length)]
    setup = (f"default model (SmolLM2-135M-Instruct), {args.device}, {torch.get_num_threads()} threads; eval: {len(texts)} GSM8K "
             f"test answers; CBQ calibration: {args.samples} GSM8K train records x <= {args.max_length} tokens, {args.epochs} "
             f"epochs per window; group size {args.group_size}")
    print(setup)
    fp_ppl = perplexity(base, tokenizer, texts)
    print(f"full precision: perplexity {fp_ppl:.3f}")
    rows = []
    for bits in args.bits:
        result = {}
        for method in ("rtn", "cbq"):
            model = copy.deepcopy(base)
            started = time.perf_counter()
            lorakit.quantize(model, bits, args.group_size, data=calibration if method == "cbq" else None, method=method,
                             epochs=args.epochs, progress=True)
            seconds = time.perf_counter() - started
            result[method] = (perplexity(model, tokenizer, texts), seconds)
            print(f"W{bits} g{args.group_size} {method}: perplexity {result[method][0]:.3f}, quantized in {seconds:.1f} s", flush=True)
            del model
        rows.append((bits, result))

    command = "python bench/quant.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"# Weight-only quantization: RTN vs CBQ (LoRA-Rounding)", "", f"Command: `{command}`", "", setup + ".", "",
             f"Full-precision perplexity: {fp_ppl:.3f}", "",
             "| bits | group | RTN ppl | CBQ ppl | CBQ / RTN | RTN s | CBQ s |", "|---|---|---|---|---|---|---|"]
    for bits, result in rows:
        (rp, rs), (cp, cs) = result["rtn"], result["cbq"]
        lines.append(f"| {bits} | {args.group_size} | {rp:.3f} | {cp:.3f} | {cp / rp:.3f} | {rs:.1f} | {cs:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(__file__).parent / "results" / f"quant_{args.device.split(':')[0]}{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
