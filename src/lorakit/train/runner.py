"""`lorakit train`: fine-tune, evaluate before and after, write a run folder.

Built on `transformers.Trainer`, so `accelerate launch` / `torchrun` give DDP or FSDP without
any distributed code of ours. Checkpoints hold only the adapter (safetensors) plus the
optimizer, scheduler and RNG states Trainer keeps, so `resume` continues a killed run and
reaches the same adapter as an uninterrupted one. Each checkpoint is published whole or not at
all (`lorakit.train.checkpoints`), so a kill at any moment leaves a run that resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorakit.core import precision
from lorakit.core.errors import ConfigError
from lorakit.core.inject import inject, trainable_parameters
from lorakit.core.io import atomic_write_bytes, atomic_write_json, load_adapter_weights, save_adapter
from lorakit.core.registry import data_initialiser
from lorakit.data import DataCollator, DataFormatError, Example, default_task, encode, load_records, to_example
from lorakit.models import load as load_model
from lorakit.optim import build_optimizer
from lorakit.optim.lisa import LISA
from lorakit.rank import build_rank_policy
from lorakit.train.callbacks import training_callbacks
from lorakit.train.checkpoints import (RunLock, newest_complete_checkpoint, publish_checkpoint, remove_leftovers,
                                       rotate_checkpoints, staging_folder)
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import evaluate
from lorakit.train.loss import causal_lm_loss, fused_loss_supported

ADAPTER_NAME = "default"


class AdapterTrainer(Trainer):
    """Trainer whose checkpoints hold the adapter only, in lorakit's (PEFT) format, and are
    published whole or not at all."""

    _staging_root: Path | None = None  # set while a checkpoint is being written
    compute_dtype: torch.dtype = torch.float32  # the run's dtype (lorakit.core.precision); set by train()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The step's loss under the run's precision (bf16 autocast, or nothing for float32), through
        the fused head + cross-entropy (`lorakit.train.loss`) where it gives the model's own loss."""
        seq_len = inputs["input_ids"].shape[-1] if "input_ids" in inputs else None
        with precision.autocast(self.compute_dtype, self.args.device, seq_len):
            if return_outputs or "labels" not in inputs or model is not self.accelerator.unwrap_model(model) \
                    or not fused_loss_supported(model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = causal_lm_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # what Trainer.compute_loss does with the model's loss
        return loss

    def _get_output_dir(self, trial) -> str:
        # Trainer's _save_checkpoint writes <this>/checkpoint-N file by file and then rotates
        # <this>: pointed at a staging folder, everything it writes (whatever files this
        # transformers version adds) lands there, and its mtime-ordered rotation sees one folder.
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        checkpoints = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        stage = staging_folder(checkpoints / name)
        main = self.args.should_save
        if main:
            shutil.rmtree(stage, ignore_errors=True)  # left by a killed run that reached this step
            stage.mkdir(parents=True)
        self.accelerator.wait_for_everyone()  # every process writes its own RNG state into the stage
        self._staging_root = stage
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                written = stage / name
                if not written.is_dir():
                    raise RuntimeError(
                        f"transformers {transformers.__version__} did not write its checkpoint under "
                        f"{str(stage)!r}; lorakit's crash-safe checkpoints expect Trainer._save_checkpoint to save "
                        "into _get_output_dir()/checkpoint-N (true from 4.56 to 5.24); pin transformers to such a version"
                    )
                publish_checkpoint(written, checkpoints / name)
                stage.rmdir()
                rotate_checkpoints(checkpoints, self.args.save_total_limit)
        finally:
            self._staging_root = None
            if main:  # a failed save (disk full, say) leaves the published checkpoints as they were
                shutil.rmtree(stage, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # Raw factors (PiSSA/OLoRA un-converted): resuming re-runs the initialiser on the base.
        save_adapter(model, output_dir or self.args.output_dir, ADAPTER_NAME, for_untouched_base=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        load_adapter_weights(model, resume_from_checkpoint, ADAPTER_NAME)


def _prompt_hash(example: Example) -> int:
    text = json.dumps(example.messages, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _held_out_split(folder: str) -> list[dict] | None:
    """A data folder's own test or validation file, when it has one (gsm8k/test.jsonl, sst2/dev.tsv)."""
    for split in ("test", "validation"):
        try:
            return load_records(folder, split=split)
        except DataFormatError:
            raise  # the file exists but is malformed: say so rather than fall back silently
        except ValueError:
            continue  # no such split in the folder
    return None


def prepare_examples(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; a held-out prompt never appears in the training split."""
    if config.data is None:
        train_records, eval_records = default_task(seed=config.seed)
    else:
        folder = Path(config.data).is_dir()
        train_records = load_records(config.data, split="train" if folder or not Path(config.data).exists() else None)
        eval_records = load_records(config.eval_data) if config.eval_data else _held_out_split(config.data) if folder else None
    fields = dict(prompt_field=config.prompt_field, response_field=config.response_field)
    train = [to_example(r, **fields) for r in train_records]
    if eval_records is None:
        # Split by a hash of the prompt, so duplicates of a prompt land on the same side.
        threshold = int(config.eval_fraction * 2**32)
        held_out = [e for e in train if _prompt_hash(e) < threshold]
        train = [e for e in train if _prompt_hash(e) >= threshold]
    else:
        held_out = [to_example(r, **fields) for r in eval_records]
        seen = {_prompt_hash(e) for e in train}
        held_out = [e for e in held_out if _prompt_hash(e) not in seen]
    if config.train_examples:
        train = train[: config.train_examples]
    if not train or not held_out:
        raise ConfigError(
            f"need training and held-out examples, got {len(train)} and {len(held_out)}; "
            "add data or pass eval_data"
        )
    return train, held_out[: config.eval_examples] if config.eval_examples else held_out


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    figure, axis = plt.subplots(figsize=(6, 4))
    if points:
        axis.plot(*zip(*points), marker="o", markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (response tokens)")
    axis.set_title("lorakit train")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, image.getvalue())


def format_table(before: dict, after: dict) -> str:
    rows = [("eval loss", f"{before['loss']:.3f}", f"{after['loss']:.3f}"),
            ("exact match", f"{100 * before['exact_match']:.1f}%", f"{100 * after['exact_match']:.1f}%")]
    lines = [f"{'':<14}{'before':>10}{'after':>10}"] + [f"{a:<14}{b:>10}{c:>10}" for a, b, c in rows]
    return "\n".join(lines)


def init_batches(encoded: list[dict], collate: DataCollator, config: TrainConfig, device) -> list[dict]:
    """The first `config.init_batches` training batches (seeded shuffle) for a data-driven init."""
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(config.seed)).tolist()
    batches = []
    for start in range(0, min(len(order), config.init_batches * config.batch_size), config.batch_size):
        batch = collate([encoded[i] for i in order[start:start + config.batch_size]])
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def run_init_options(options_cls: type, config: TrainConfig) -> dict[str, Any]:
    """Options of a data-driven init that describe the run (LoRA-SB's first-step size needs the
    run's lr, warm-up fraction and length), taken from this run unless the user set them."""
    run = {"lr": config.learning_rate, "total_steps": config.max_steps,
           "warmup_ratio": min(1.0, max(config.warmup_steps, 1) / config.max_steps)}
    fields = {f.name for f in dataclasses.fields(options_cls)}
    return {name: value for name, value in run.items() if name in fields}


def training_arguments(config: TrainConfig, checkpoints: Path, progress: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not progress,
    )


def _is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a plain run), known before TrainingArguments exist."""
    return int(os.environ.get("RANK", "0")) == 0


def resume_checkpoint(checkpoints: Path, progress: bool, report: bool = True) -> str | None:
    """The newest complete checkpoint under `checkpoints`; with `report`, says on stderr which
    newer ones were skipped and why (every process of a distributed run chooses, one reports)."""
    choice = newest_complete_checkpoint(checkpoints)
    for folder, problem in choice.skipped if report else ():
        print(f"lorakit train --resume: skipping {folder.name}: {problem}", file=sys.stderr, flush=True)
    if choice.chosen is None:
        if report and (progress or choice.skipped):
            print(f"no complete checkpoint under {checkpoints}; starting from step 0", file=sys.stderr, flush=True)
        return None
    if report and progress:
        print(f"resuming from {choice.chosen}", flush=True)
    return str(choice.chosen)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, model=None, tokenizer=None) -> dict[str, Any]:
    """Run one fine-tuning job as `config` describes; returns the metrics written to metrics.json.

    `model`/`tokenizer` may be given to skip loading `config.model` (tests, notebooks). Only one
    run at a time may write a run folder (a second one is refused).
    """
    config.validate()
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with precision.denormals_flushed():  # CPU only; the caller's setting comes back afterwards
        if not _is_main_process():
            return _train(config, run_dir, resume, progress, model, tokenizer)
        with RunLock(run_dir):
            return _train(config, run_dir, resume, progress, model, tokenizer)


def _train(config: TrainConfig, run_dir: Path, resume: bool, progress: bool, model, tokenizer) -> dict[str, Any]:
    if config.threads:
        torch.set_num_threads(config.threads)
    atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    set_seed(config.seed)
    checkpoints = run_dir / "checkpoints"
    args = training_arguments(config, checkpoints, progress)
    if model is None:
        dtype = precision.resolve_dtype(config.dtype, args.device)
        model, tokenizer = load_model(config.model, dtype=dtype)
    elif config.dtype == "auto":  # a model the caller built: "auto" trains it in the dtype it has, unconverted
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        dtype = torch.bfloat16 if own == torch.bfloat16 else torch.float32
    else:
        dtype = precision.resolve_dtype(config.dtype, args.device)
        precision.prepare_model(model, dtype)
    train_examples, eval_examples = prepare_examples(config)
    model.to(args.device)  # evaluate where Trainer will train (a GPU when there is one)
    if progress:
        support = precision.bf16_support(args.device.type)
        print(f"dtype: {precision.dtype_name(dtype)} (--dtype {config.dtype}; bf16 on {args.device.type} "
              f"{'fast' if support.fast else 'not fast'}: {support.evidence})", flush=True)
    eval_kwargs = dict(max_length=config.max_length, max_new_tokens=config.max_new_tokens,
                       batch_size=config.eval_batch_size, progress=progress)

    before_path = run_dir / "metrics_before.json"
    if resume and before_path.exists():
        before = json.loads(before_path.read_text())
    else:
        if progress:
            print(f"evaluating the base model on {len(eval_examples)} held-out examples ...", flush=True)
        before = evaluate(model, tokenizer, eval_examples, **eval_kwargs)
        atomic_write_json(before_path, before)

    encoded = [encode(tokenizer, example, config.max_length) for example in train_examples]
    collate = DataCollator.from_tokenizer(tokenizer)
    policy = build_rank_policy(config.rank_policy, config.rank_policy_options) if config.rank_policy else None
    if policy is not None:  # DiffoRA's gate steps use held-out training batches
        encoded = policy.hold_out(encoded, collate, config.batch_size, seed=config.seed)
    set_seed(config.seed)  # the adapter's random init must not depend on how much evaluation drew
    adapter_config = config.adapter_config()
    init_data = None
    from_data = data_initialiser(getattr(adapter_config, "init", None) or "")
    if from_data is not None:
        init_data = init_batches(encoded, collate, config, args.device)
        adapter_config.init_options = {**run_init_options(from_data.options, config), **adapter_config.init_options}
        adapter_config.validate()
    if policy is not None:  # a policy may set per-module ranks before inject (LaMDA++)
        adapter_config = policy.prepare_config(model, adapter_config)
    inject(model, adapter_config, ADAPTER_NAME, data=init_data, progress=progress)
    trainable, total = trainable_parameters(model)
    if progress:
        print(f"{config.method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")

    optimizers = (None, None)  # Trainer's own AdamW
    if config.optimizer != "adamw":
        optimizers = (build_optimizer(config.optimizer, model, config.learning_rate, config.weight_decay,
                                      config.optimizer_options), None)
    callbacks = training_callbacks(config.method)
    if config.lisa_layers:  # LISA over the adapter's parameters, grouped by decoder layer
        callbacks.append(LISA(model, config.lisa_layers, config.lisa_interval, seed=config.seed))
    if policy is not None:
        callbacks.append(policy)
    trainer = AdapterTrainer(
        model=model, args=args, train_dataset=encoded, data_collator=collate,
        callbacks=callbacks, optimizers=optimizers,
    )
    trainer.compute_dtype = dtype
    if args.should_save:
        remove_leftovers(checkpoints)  # a killed run's staging and trash folders
    last = resume_checkpoint(checkpoints, progress, report=args.should_save) if resume else None
    result = trainer.train(resume_from_checkpoint=last)

    after = evaluate(model, tokenizer, eval_examples, **eval_kwargs)
    save_adapter(model, run_dir / "adapter", ADAPTER_NAME)
    plot_loss_curve(trainer.state.log_history, run_dir / "loss_curve.png")
    metrics = {
        "before": before,
        "after": after,
        "train": {
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "seconds": result.metrics.get("train_runtime"),
            "train_examples": len(train_examples),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "resumed_from": last,
            "dtype": precision.dtype_name(dtype),
        },
        "log_history": trainer.state.log_history,
    }
    if policy is not None:
        metrics["train"]["ranks"] = policy.final_ranks(model)
    atomic_write_json(run_dir / "metrics.json", metrics)
    if progress:
        if policy is not None:
            print(f"final ranks ({config.rank_policy}):\n{policy.rank_table(model, ADAPTER_NAME)}")
        print(format_table(before, after))
        print(f"run folder: {run_dir} (adapter/, metrics.json, config.yaml, loss_curve.png)")
    return metrics
