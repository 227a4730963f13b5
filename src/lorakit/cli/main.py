"""`lorakit <verb>`: train, eval, generate, export, merge, analyze, prune, quantize, serve.

Every `TrainConfig` field is a flag (`--max-steps 60`), every adapter config field too
(`--r 8 --use-dora`); a YAML file (`--config run.yaml`) supplies the rest, flags win.
`lorakit export DIR --to lora --rank R [--for vllm] --out OUT` writes any adapter as a standard
LoRA adapter (`lorakit.export`); `merge`, `analyze`, `prune` and `quantize` run the tools of
`lorakit.merge`, `lorakit.analysis`, `lorakit.prune` and `lorakit.quant` (`lorakit VERB --help`);
`lorakit serve --adapters DIR` serves every adapter under DIR over an OpenAI-compatible HTTP API.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import lorakit
from lorakit.core.errors import LorakitError, LorakitWarning
from lorakit.core.precision import DTYPE_CHOICES
from lorakit.core.registry import method_spec, registered_methods
from lorakit.train.config import TrainConfig

_REGEX_CHARS = set(".*+?[](){}|\\^$")
DTYPE_HELP = ("auto: bfloat16 where the hardware runs bf16 products fast (CPU with AVX512-BF16 or AMX-BF16, CUDA "
              "Ampere+), float32 elsewhere; bfloat16: base weights in bf16 (training: under autocast, adapter and "
              "optimizer state in float32) (default: {default})")


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear', a regex ('.*\\.(q|v)_proj'), or comma-separated names ('q_proj,v_proj')."""
    if text == "all-linear":
        return text
    if "," not in text and _REGEX_CHARS & set(text):
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive(kind: type):
    """An argparse type: a number of `kind` above 0, else a usage error naming the value (before
    any model is loaded)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_field_flag(parser: argparse.ArgumentParser, field: dataclasses.Field, dest: str, seen: set[str],
                    help_text: str | None = None) -> None:
    if field.name in seen or field.name in ("adapter",):
        return
    seen.add(field.name)
    # Config modules use postponed annotations, so the type is its source text ("int | None").
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    default = field.default if field.default is not dataclasses.MISSING else None
    kwargs: dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, metavar=field.name.upper())
    if field.name == "target_modules":
        kwargs.update(type=parse_target_modules, help="'all-linear', a regex, or comma-separated names")
    elif field.name == "dtype":
        kwargs.update(type=str, choices=DTYPE_CHOICES, help=DTYPE_HELP.format(default=default))
    elif isinstance(default, bool) or annotation == "bool":
        kwargs.update(action=argparse.BooleanOptionalAction)
        kwargs.pop("metavar")
    elif "dict" in annotation:
        kwargs.update(type=json.loads, help="JSON object")
    elif isinstance(default, int) or annotation.startswith("int"):
        kwargs.update(type=int)
    elif isinstance(default, float) or annotation.startswith("float"):
        kwargs.update(type=float)
    else:
        kwargs.update(type=str)
    kwargs.setdefault("help", help_text or f"(default: {default!r})")
    parser.add_argument(_flag(field.name), **kwargs)


def _train_parser(sub) -> None:
    parser = sub.add_parser("train", help="fine-tune a model with an adapter (defaults: the embedded model, the built-in task, LoRA)")
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                        help="continue from the last checkpoint (of RUN_DIR, whose config.yaml is reused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    seen: set[str] = set()
    for field in dataclasses.fields(TrainConfig):
        _add_field_flag(parser, field, f"train.{field.name}", seen)
    group = parser.add_argument_group("adapter fields (any registered method's config; defaults are each method's own)")
    owners: dict[str, list[str]] = {}
    for name in registered_methods():
        for field in dataclasses.fields(method_spec(name).config_cls):
            owners.setdefault(field.name, []).append(name)
    for name in registered_methods():
        for field in dataclasses.fields(method_spec(name).config_cls):
            _add_field_flag(group, field, f"adapter.{field.name}", seen, help_text=f"field of {', '.join(owners[field.name])}")


def _eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="score an adapter on held-out data (loss and exact match)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (omit to score the base model)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="load an adapter whose weights hold NaN or inf (refused by default)")
    parser.add_argument("--data", default="default", help="JSONL/JSON/CSV file or folder, or 'default' for the built-in task's held-out split")
    parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path, else the embedded default)")
    parser.add_argument("--examples", type=int, default=100, help="score at most this many examples")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP.format(default="float32: scores comparable across machines"))


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="generate a reply with a base model and an adapter")
    parser.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model alone)")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="load an adapter whose weights hold NaN or inf (refused by default)")
    parser.add_argument("--prompt", required=True, action="append", help="user message (repeat for several)")
    parser.add_argument("--model", help="base model (default: from the adapter, else the embedded default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP.format(default="float32"))


def _export_parser(sub) -> None:
    parser = sub.add_parser(
        "export", help="write any adapter as a standard LoRA adapter in PEFT format, or in the shape vLLM serves",
        description="--to lora --rank R: each layer's update dW (against the untouched base) becomes its best "
        "rank-R LoRA (truncated SVD); the relative error per layer is printed, exact when rank(dW) <= R. "
        "--for vllm: one global rank and alpha, each module's scaling baked into lora_B, no patterns, "
        "DoRA or bias; a LoRA adapter is copied as it is, anything else needs --to lora --rank R.")
    parser.add_argument("adapter", type=Path, metavar="DIR", help="adapter folder (lorakit's or PEFT's)")
    parser.add_argument("--to", choices=["lora"], help="lora: approximate the update by a rank-R LoRA (needs --rank)")
    parser.add_argument("--rank", type=int, metavar="R", help="rank of the exported LoRA (with --to lora)")
    parser.add_argument("--for", dest="for_server", choices=["vllm"], help="vllm: write only what vLLM's LoRA loader accepts")
    parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path if it loads locally, else the embedded default)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder (must be new or empty)")
    parser.add_argument("--force", action="store_true", help="overwrite the adapter files in a non-empty --out")
    parser.add_argument("--device", help="where the SVDs run (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-layer table")


def _analyze_parser(sub) -> None:
    parser = sub.add_parser(
        "analyze", help="intruder dimensions, update spectra, effective ranks and norm limits of an adapter or a fine-tuned model",
        description="Per layer: intruder dimensions of W0 + dW (top-k singular vectors whose max |cosine| with every "
        "base singular vector is below the threshold; arXiv 2410.21228), singular values and effective rank of dW, "
        "the layer's adapter rank, and for q/k/v the max-entry norms against sqrt(ln L) (arXiv 2406.03136). "
        "Writes report.txt, analysis.json and spectra.png into --out.")
    parser.add_argument("source", type=Path, metavar="ADAPTER_OR_MODEL", help="adapter folder, or a fully fine-tuned model folder")
    parser.add_argument("--base", help="base model (adapter default: its base_model_name_or_path if local, else the embedded default; required for a model folder)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: ADAPTER_OR_MODEL-analysis next to it)")
    parser.add_argument("--top-k", type=int, default=10, help="fine-tuned singular vectors examined (default: 10)")
    parser.add_argument("--threshold", type=float, default=0.5, help="cosine threshold eps (default: 0.5)")
    parser.add_argument("--norm-examples", type=int, default=4, help="held-out prompts for the norm check (0 skips it)")
    parser.add_argument("--device", help="where the SVDs run (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or loading messages")


def _prune_parser(sub) -> None:
    from lorakit.prune import PruneOptions

    parser = sub.add_parser(
        "prune", help="structured pruning guided by a LoRA (LoRAPrune): a physically smaller model",
        description="Fine-tunes a LoRA on --data while masking the lowest-scoring key/value groups and MLP channels "
        "(LoRAPrune's LoRA-gradient importance, EMA, cubic schedule; arXiv 2305.18403), merges the LoRA, removes the "
        "masked groups and writes a transformers model folder plus prune_report.json into --out.")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of KV groups and MLP channels pruned per layer, in [0, 1)")
    parser.add_argument("--model", help="model to prune (default: the embedded default)")
    parser.add_argument("--data", default="default", help="training records: JSONL/JSON/CSV file or folder, or 'default' (built-in task)")
    parser.add_argument("--eval-data", help="held-out records for perplexity before/after (default: the built-in task's held-out split with --data default, else none)")
    parser.add_argument("--examples", type=int, default=256, help="training examples used (default: 256)")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out examples scored (default: 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output model folder (must be new or empty)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--device", help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group("pruning options (lorakit.prune.PruneOptions)")
    seen: set[str] = set()
    for field in dataclasses.fields(PruneOptions):
        _add_field_flag(group, field, f"prune.{field.name}", seen)


def _merge_parser(sub) -> None:
    parser = sub.add_parser(
        "merge", help="merge LoRA adapters of one base into one PEFT LoRA adapter (LoRA-LEGO, linear, cat, svd, TIES, DARE)",
        description="linear: the exact weighted sum of the adapters' updates, re-factorised at its exact rank; cat: the "
        "same sum as concatenated factors; svd: its best rank-R approximation; ties / dare: TIES-Merging / DARE on the "
        "updates, then rank R; lego: LoRA-LEGO (arXiv 2409.16167), k-means of the rank-1 units to R clusters with dual "
        "reweighting. Writes a PEFT LoRA folder plus merge_report.json (see lorakit.merge).")
    parser.add_argument("adapters", type=Path, nargs="+", metavar="DIR", help="LoRA adapter folders (lorakit's or PEFT's)")
    parser.add_argument("--method", default="linear", choices=["lego", "linear", "cat", "svd", "ties", "dare"])
    parser.add_argument("--weights", type=float, nargs="+", help="one per adapter (default: 1/N; 1 for ties and lego)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder (must be new or empty)")
    parser.add_argument("--rank", type=int, help="merged rank (svd, ties, dare, lego)")
    parser.add_argument("--density", type=float, help="fraction of entries kept (ties: 0.2, dare: 0.1)")
    parser.add_argument("--sign-method", choices=["total", "frequency"], help="ties: sign election (default: total)")
    parser.add_argument("--seed", type=int, help="dare drop masks / lego k-means++ seed (default: 0)")
    parser.add_argument("--iterations", type=int, help="lego: k-means iterations (default: 10)")
    parser.add_argument("--param-reweight", action=argparse.BooleanOptionalAction, help="lego: norm-decay reweighting (default: on)")
    parser.add_argument("--output-reweight", action=argparse.BooleanOptionalAction, help="lego: sqrt(r/k) output reweighting (default: on)")
    parser.add_argument("--param-norm", choices=["linf", "l2"], help="lego: norm of the parameter reweighting (default: linf)")
    parser.add_argument("--feature", choices=["direction", "raw"], help="lego: clustering feature (default: direction)")
    parser.add_argument("--tolerance", type=float, help="linear: relative singular-value cut-off (default: 1e-10)")
    parser.add_argument("--model", help="base model, needed only for DoRA inputs (default: from the adapters, else the embedded default)")
    parser.add_argument("--force", action="store_true", help="overwrite the adapter files in a non-empty --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-layer table")


def _quantize_parser(sub) -> None:
    parser = sub.add_parser(
        "quantize", help="weight-only quantization of a model's decoder Linear layers: CBQ with LoRA-Rounding, or round-to-nearest",
        description="cbq (arXiv 2312.07950): coarse-to-fine outlier pre-processing, then cross-block reconstruction in "
        "overlapping windows of decoder blocks with LoRA-Rounding (low-rank learnt rounding) and learnt group steps, on "
        "calibration records from --data; rtn: round-to-nearest, no data. Writes quantized_model.safetensors (integer "
        "codes, group steps and zero-points), quantize_config.json and quant_report.json into --out; reload with "
        "lorakit.quant.load_quantized(OUT, MODEL).")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight, 2..8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=128, help="input columns per step/zero-point, -1: one per row (default: 128)")
    parser.add_argument("--method", default="cbq", choices=["cbq", "rtn"])
    parser.add_argument("--model", help="model to quantize (default: the embedded default)")
    parser.add_argument("--data", default="default", help="calibration records: JSONL/JSON/CSV file or folder, or 'default' (built-in task)")
    parser.add_argument("--samples", type=int, default=8, help="calibration records (default: 8)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per calibration record (default: 128)")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration records per step (default: 1)")
    parser.add_argument("--eval-data", help="held-out records whose responses are scored (perplexity before/after)")
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out records scored (default: 64)")
    for flag, kind, text in (("--window", int, "blocks per window (default: 2)"), ("--overlap", int, "blocks shared by consecutive windows (default: 1)"),
                             ("--epochs", int, "passes over the calibration batches per window (default: 2)"),
                             ("--rank", int, "LoRA-Rounding rank (default: 4)"), ("--lr", float, "rounding factors' Adam lr (default: 1e-2)"),
                             ("--step-lr", float, "log step sizes' Adam lr (default: 1e-3)"), ("--kl-weight", float, "KL term weight (default: 1)"),
                             ("--round-weight", float, "rounding regulariser weight (default: 1)")):
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)
    parser.add_argument("--weight-outliers", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help="CFP weight truncation (default: off)")
    parser.add_argument("--activation-outliers", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help="CFP activation scaling (default: on)")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT", help="output folder (must be new or empty)")
    parser.add_argument("--force", action="store_true", help="overwrite the files in a non-empty --out")
    parser.add_argument("--device", help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _serve_parser(sub) -> None:
    parser = sub.add_parser(
        "serve", help="serve a base model and every adapter under a folder over an OpenAI-compatible HTTP API (S-LoRA batching)",
        description="POST /v1/completions and /v1/chat/completions (the 'model' field names an adapter: a sub-folder of "
        "--adapters, or the base model's name; 'stream': true for server-sent events), GET /v1/models, "
        "POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's bodies), GET /health, GET /metrics (Prometheus). "
        "Requests with different adapters share each batch (lorakit.serve).")
    parser.add_argument("--model", help="base model (default: the embedded default)")
    parser.add_argument("--adapters", type=Path, metavar="DIR", help="adapter root: every sub-folder holding adapter_config.json "
                        "is served under its folder name; load_lora_adapter paths must lie inside it")
    parser.add_argument("--allow-any-adapter-path", action="store_true",
                        help="without --adapters, let load_lora_adapter read any path on this machine (only when every "
                        "client is trusted; default: refused with 403)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    parser.add_argument("--served-model-name", help="the base model's name in requests and /v1/models (default: --model, or the embedded model's Hub id)")
    parser.add_argument("--max-batch-size", type=_positive(int), default=16, help="most requests decoded together (default: 16)")
    parser.add_argument("--max-adapters-per-step", type=_positive(int), default=16,
                        help="most distinct adapters in one batch (default: 16)")
    parser.add_argument("--max-queue", type=_positive(int), default=256, help="waiting requests beyond which the server answers 429 (default: 256)")
    parser.add_argument("--host-cache-mb", type=_positive(float), default=2048, help="host-memory LRU cache of adapter weights, MiB (default: 2048)")
    parser.add_argument("--device-budget-mb", type=_positive(float), help="unified device pool for the KV cache and resident adapters, MiB (default: 2048)")
    parser.add_argument("--mode", choices=["segment", "bmm"], default="segment", help="batched-LoRA evaluation (default: segment)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help=DTYPE_HELP.format(
        default="float32: measured on an AVX512-BF16 CPU, bf16 makes the base 1.46x faster but the multi-adapter "
        "path 0.92x, see README"))
    parser.add_argument("--device", help="where the model runs (default: cuda if available, else cpu)")
    parser.add_argument("--shutdown-timeout", type=_positive(float), default=30.0, help="seconds running requests get to finish on Ctrl-C / SIGTERM (default: 30)")
    parser.add_argument("--max-body-bytes", type=_positive(int), default=8 * 2**20, help="largest request body; larger ones get 413 (default: 8 MiB)")
    parser.add_argument("--body-timeout", type=_positive(float), default=30.0,
                        help="seconds a client has to send its whole request body; slower ones get 408 (default: 30)")
    parser.add_argument("--max-prompt-chars", type=_positive(int),
                        help="longest prompt (or chat messages together) in characters, refused before tokenizing "
                        "(default: 32 per token of the model's context)")
    parser.add_argument("--stall-timeout", type=_positive(float), default=30.0,
                        help="seconds the engine may go without a loop iteration, or without progress while requests "
                        "wait, before /health answers 503 (default: 30)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
    _merge_parser(sub)
    _analyze_parser(sub)
    _prune_parser(sub)
    _quantize_parser(sub)
    _serve_parser(sub)
    return parser


def train_config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("train."):
            overrides[key[len("train."):]] = value
        elif key.startswith("adapter."):
            overrides.setdefault("adapter", {})[key[len("adapter."):]] = value
    resume = args.resume
    config_path = args.config
    if isinstance(resume, str):
        run_dir = Path(resume)
        config_path = config_path or run_dir / "config.yaml"
        overrides.setdefault("output_dir", str(run_dir))
    if resume is True and "output_dir" not in overrides and config_path is None:
        raise LorakitError("--resume needs the run to continue: pass --resume RUN_DIR (or --output-dir RUN_DIR)")
    if config_path is not None:
        return TrainConfig.from_yaml(config_path, overrides), bool(resume)
    return TrainConfig.from_dict(overrides), bool(resume)


def _base_for(adapter: Path | None, model: str | None) -> str:
    if model:
        return model
    if adapter is not None:
        from lorakit.core.io import read_adapter_file_dict

        base = read_adapter_file_dict(adapter)[1].get("base_model_name_or_path")  # checked: a string or null
        if base and base != lorakit.models.DEFAULT_MODEL_HUB_ID:
            return base
    return lorakit.models.DEFAULT_MODEL


def _load_with_adapter(adapter: Path | None, model_spec: str | None, allow_non_finite: bool = False,
                       dtype: str = "float32"):
    from lorakit.core.precision import resolve_dtype

    # eval and generate run where the model loads, on the CPU; an adapter on a bf16 base stays float32.
    model, tokenizer = lorakit.models.load(_base_for(adapter, model_spec), dtype=resolve_dtype(dtype, "cpu"))
    if adapter is not None:
        lorakit.load_adapter(model, adapter, allow_non_finite=allow_non_finite)
    return model, tokenizer


def run_eval(args: argparse.Namespace) -> None:
    from lorakit.data import default_task, load_records, to_example
    from lorakit.train.evaluate import evaluate

    model, tokenizer = _load_with_adapter(args.adapter, args.model, args.allow_non_finite, args.dtype)
    records = default_task()[1] if args.data == "default" else load_records(args.data)
    examples = [to_example(r) for r in records][: args.examples]
    result = evaluate(model, tokenizer, examples, max_length=args.max_length, max_new_tokens=args.max_new_tokens, progress=True)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    for sample in result["samples"][:3]:
        print(f"- {sample['prompt']!r}\n  reference:  {sample['reference']!r}\n  prediction: {sample['prediction']!r}")


def run_generate(args: argparse.Namespace) -> None:
    from lorakit.data import Example
    from lorakit.train.evaluate import generate_responses

    model, tokenizer = _load_with_adapter(args.adapter, args.model, args.allow_non_finite, args.dtype)
    examples = [Example(messages=[{"role": "user", "content": p}], response="") for p in args.prompt]
    for prompt, reply in zip(args.prompt, generate_responses(model, tokenizer, examples, args.max_new_tokens)):
        print(reply if len(args.prompt) == 1 else f"> {prompt}\n{reply}\n")


def run_export(args: argparse.Namespace) -> None:
    from lorakit.export import export_adapter, format_report

    if (args.to == "lora") != (args.rank is not None):
        raise LorakitError("--to lora and --rank R go together: pass both (e.g. --to lora --rank 16)")
    if args.to is None and args.for_server is None:
        raise LorakitError("say what to export to: --to lora --rank R, --for vllm, or both")
    report = export_adapter(args.model, args.adapter, args.out, rank=args.rank, for_vllm=args.for_server == "vllm",
                            force=args.force, progress=not args.quiet, device=args.device)
    print(format_report(report, per_layer=not args.quiet))
    for warning in report.warnings:
        print(f"lorakit export: warning: {warning}", file=sys.stderr)


def run_analyze(args: argparse.Namespace) -> None:
    from lorakit.analysis import analyze, format_report

    out = args.out or args.source.resolve().parent / f"{args.source.resolve().name}-analysis"
    report = analyze(args.source, args.base, out, top_k=args.top_k, threshold=args.threshold,
                     norm_examples=args.norm_examples, device=args.device, progress=not args.quiet,
                     log=None if args.quiet else print)
    print(format_report(report, per_layer=False))  # the per-layer table is in report.txt
    print(f"wrote {out}: report.txt (per-layer table), analysis.json, spectra.png")


def run_prune(args: argparse.Namespace) -> None:
    import torch

    from lorakit.data import DataCollator, default_task, encode, load_records, to_example
    from lorakit.prune import prune

    options = {key[len("prune."):]: value for key, value in vars(args).items() if key.startswith("prune.")}
    model, tokenizer = lorakit.models.load(args.model)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    collate = DataCollator.from_tokenizer(tokenizer)

    def batches(records: list[dict], limit: int) -> list[dict]:
        encoded = [encode(tokenizer, to_example(r), args.max_length) for r in records[:limit]]
        return [collate(encoded[i:i + args.batch_size]) for i in range(0, len(encoded), args.batch_size)]

    train_records = default_task()[0] if args.data == "default" else load_records(args.data)
    eval_source = args.eval_data or ("default" if args.data == "default" else None)
    eval_records = None if eval_source is None else default_task()[1] if eval_source == "default" else load_records(eval_source)
    report = prune(model, args.ratio, data=batches(train_records, args.examples),
                   eval_data=None if eval_records is None else batches(eval_records, args.eval_examples),
                   tokenizer=tokenizer, out_dir=args.out, force=args.force, progress=not args.quiet, **options).prune_report
    print(json.dumps({k: report[k] for k in ("ratio", "parameters_before", "parameters_after", "perplexity_before",
                                             "perplexity_after", "importance_memory")}, indent=2))


def run_merge(args: argparse.Namespace) -> None:
    from lorakit.merge import _OPTIONS, format_report, merge_adapters

    options = {key: getattr(args, key) for key in _OPTIONS[args.method] if getattr(args, key) is not None}
    given = [key for key in ("rank", "density", "sign_method", "seed", "iterations", "param_reweight", "output_reweight",
                             "param_norm", "feature", "tolerance") if getattr(args, key) is not None and key not in options]
    if given:
        raise LorakitError(f"--method {args.method} takes no {', '.join('--' + k.replace('_', '-') for k in given)}")
    report = merge_adapters(args.adapters, args.method, args.weights, args.out, model=args.model, force=args.force,
                            progress=not args.quiet, **options)
    print(format_report(report, per_layer=not args.quiet))
    for warning in report.warnings:
        print(f"lorakit merge: warning: {warning}", file=sys.stderr)


def run_quantize(args: argparse.Namespace) -> None:
    import torch

    from lorakit.data import default_task, load_records, to_example
    from lorakit.quant import calibration_batches, perplexity, quantize

    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise LorakitError(f"--out {args.out} is not empty; pick a new folder or pass --force")
    options = {key: getattr(args, key) for key in ("window", "overlap", "epochs", "rank", "lr", "step_lr", "kl_weight",
                                                  "round_weight", "weight_outliers", "activation_outliers") if hasattr(args, key)}
    model, tokenizer = lorakit.models.load(args.model)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = None
    if args.method == "cbq":
        records = default_task()[0] if args.data == "default" else load_records(args.data)
        data = calibration_batches(tokenizer, records, args.samples, args.max_length, args.batch_size)
    texts = [to_example(r).response for r in load_records(args.eval_data)[: args.eval_examples]] if args.eval_data else []
    before = perplexity(model, tokenizer, texts) if texts else None
    quantize(model, args.bits, args.group_size, data=data, method=args.method, progress=not args.quiet, **options)
    extra = {"perplexity_before": before, "perplexity_after": perplexity(model, tokenizer, texts)} if texts else {}
    lorakit.quant.save_quantized(model, args.out, extra_report=extra)
    state = model._lorakit_quant["report"]
    print(json.dumps({"method": args.method, "bits": args.bits, "group_size": args.group_size, "seconds": state["seconds"], **extra}, indent=2))
    print(f"wrote {args.out}: quantized_model.safetensors, quantize_config.json, quant_report.json")


def run_serve(args: argparse.Namespace) -> None:
    import torch

    from lorakit.core.precision import dtype_name, flush_denormals, resolve_dtype
    from lorakit.serve.engine import Engine
    from lorakit.serve.server import serve
    from lorakit.serve.store import AdapterStore

    if args.adapters is not None and not args.adapters.is_dir():
        raise LorakitError(f"--adapters {args.adapters} is not a folder; pass the folder whose sub-folders hold the adapters")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)  # the engine serves in the model's dtype, adapters cast to it
    if torch.device(device).type == "cpu":
        flush_denormals()  # subnormal operands cost x86 cores microcode time (lorakit.core.precision)
    model, tokenizer = lorakit.models.load(args.model, dtype=dtype)
    model.to(device)
    name = args.served_model_name or args.model or lorakit.models.DEFAULT_MODEL_HUB_ID
    store = AdapterStore(args.adapters, host_budget_bytes=int(args.host_cache_mb * 2**20), base_model=model,
                         allow_any_path=args.allow_any_adapter_path)
    budget = None if args.device_budget_mb is None else int(args.device_budget_mb * 2**20)
    engine = Engine(model, tokenizer, store, max_batch_size=args.max_batch_size, max_adapters_per_step=args.max_adapters_per_step,
                    max_queue=args.max_queue, device_budget_bytes=budget, mode=args.mode, model_name=name,
                    max_prompt_chars=args.max_prompt_chars, stall_timeout=args.stall_timeout)
    print(f"lorakit serve: {name} ({dtype_name(dtype)}) with {len(store.names())} adapter(s) from {args.adapters} on "
          f"http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(engine, args.host, args.port, shutdown_timeout=args.shutdown_timeout, max_body_bytes=args.max_body_bytes,
          body_timeout=args.body_timeout)


def run_train(args: argparse.Namespace) -> None:
    from lorakit.train.runner import train

    config, resume = train_config_from_args(args)
    train(config, resume=resume, progress=not args.quiet)


VERBS = {"train": run_train, "eval": run_eval, "generate": run_generate, "export": run_export, "merge": run_merge,
         "analyze": run_analyze, "prune": run_prune, "quantize": run_quantize, "serve": run_serve}


def _run(args: argparse.Namespace) -> None:
    VERBS[args.verb](args)


@contextlib.contextmanager
def _plain_warnings(verb: str) -> Iterator[None]:
    """lorakit's own warnings as one line, `lorakit VERB: warning: ...`, like its errors."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, LorakitWarning):
            print(f"lorakit {verb}: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _plain_warnings(args.verb):
            _run(args)
    except (LorakitError, ValueError, OSError) as err:  # a bad input, file or setting: one line, no traceback
        print(f"lorakit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
