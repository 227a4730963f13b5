"""`lorakit <verb>`: train, eval, generate, export.

Every `TrainConfig` field is a flag (`--max-steps 60`), every adapter config field too
(`--r 8 --use-dora`); a YAML file (`--config run.yaml`) supplies the rest, flags win.
`lorakit export DIR --to lora --rank R [--for vllm] --out OUT` writes any adapter as a standard
LoRA adapter (see `lorakit.export`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import lorakit
from lorakit.core.errors import LorakitError
from lorakit.core.registry import method_spec, registered_methods
from lorakit.train.config import TrainConfig

_REGEX_CHARS = set(".*+?[](){}|\\^$")


def parse_target_modules(text: str) -> str | list[str]:
    """'all-linear', a regex ('.*\\.(q|v)_proj'), or comma-separated names ('q_proj,v_proj')."""
    if text == "all-linear":
        return text
    if "," not in text and _REGEX_CHARS & set(text):
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


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
    parser.add_argument("--data", default="default", help="JSONL/JSON/CSV file or folder, or 'default' for the built-in task's held-out split")
    parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path, else the embedded default)")
    parser.add_argument("--examples", type=int, default=100, help="score at most this many examples")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="generate a reply with a base model and an adapter")
    parser.add_argument("--adapter", type=Path, help="adapter folder (omit for the base model alone)")
    parser.add_argument("--prompt", required=True, action="append", help="user message (repeat for several)")
    parser.add_argument("--model", help="base model (default: from the adapter, else the embedded default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"lorakit {lorakit.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _generate_parser(sub)
    _export_parser(sub)
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
        config = json.loads((adapter / "adapter_config.json").read_text()) if (adapter / "adapter_config.json").exists() else {}
        base = config.get("base_model_name_or_path")
        if base and base != lorakit.models.DEFAULT_MODEL_HUB_ID:
            return base
    return lorakit.models.DEFAULT_MODEL


def _load_with_adapter(adapter: Path | None, model_spec: str | None):
    model, tokenizer = lorakit.models.load(_base_for(adapter, model_spec))
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    return model, tokenizer


def run_eval(args: argparse.Namespace) -> None:
    from lorakit.data import default_task, load_records, to_example
    from lorakit.train.evaluate import evaluate

    model, tokenizer = _load_with_adapter(args.adapter, args.model)
    records = default_task()[1] if args.data == "default" else load_records(args.data)
    examples = [to_example(r) for r in records][: args.examples]
    result = evaluate(model, tokenizer, examples, max_length=args.max_length, max_new_tokens=args.max_new_tokens, progress=True)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    for sample in result["samples"][:3]:
        print(f"- {sample['prompt']!r}\n  reference:  {sample['reference']!r}\n  prediction: {sample['prediction']!r}")


def run_generate(args: argparse.Namespace) -> None:
    from lorakit.data import Example
    from lorakit.train.evaluate import generate_responses

    model, tokenizer = _load_with_adapter(args.adapter, args.model)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "train":
            from lorakit.train.runner import train

            config, resume = train_config_from_args(args)
            train(config, resume=resume, progress=not args.quiet)
        elif args.verb == "eval":
            run_eval(args)
        elif args.verb == "generate":
            run_generate(args)
        elif args.verb == "export":
            run_export(args)
    except (LorakitError, ValueError, FileNotFoundError) as err:
        print(f"lorakit {args.verb}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
