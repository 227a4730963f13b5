"""Held-out evaluation: response-token loss and greedy exact-match accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lorakit.data import IGNORE_INDEX, DataCollator, Example, encode, encode_prompt, exact_match


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_loss(model, tokenizer, examples: list[Example], max_length: int, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token (prompt tokens excluded), over all examples."""
    collate = DataCollator.from_tokenizer(tokenizer)
    encoded = [encode(tokenizer, example, max_length) for example in examples]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(encoded[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted_logits = logits[:, :-1].float()
        shifted_labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        ).item()
        count += int((shifted_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_responses(
    model, tokenizer, examples: list[Example], max_new_tokens: int = 64, batch_size: int = 32, progress: bool = False
) -> list[str]:
    """Greedy completions of each example's prompt (batched, left-padded)."""
    collate = DataCollator.from_tokenizer(tokenizer, padding_side="left")
    prompts = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in (encode_prompt(tokenizer, e) for e in examples)]
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress, leave=False):
        batch = {k: v.to(_device(model)) for k, v in collate(prompts[start:start + batch_size]).items()}
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return outputs


def evaluate(
    model, tokenizer, examples: list[Example], max_length: int = 128, max_new_tokens: int = 16,
    batch_size: int = 32, progress: bool = False,
) -> dict:
    """{'loss', 'exact_match', 'examples', 'samples'}: loss per response token and the fraction of
    greedy completions that equal the reference after `lorakit.data.normalize_answer`."""
    predictions = generate_responses(model, tokenizer, examples, max_new_tokens, batch_size, progress)
    hits = [exact_match(p, e.response) for p, e in zip(predictions, examples)]
    return {
        "loss": response_loss(model, tokenizer, examples, max_length, max(1, batch_size // 2)),
        "exact_match": sum(hits) / max(len(hits), 1),
        "examples": len(examples),
        "samples": [
            {"prompt": e.messages[-1]["content"], "reference": e.response, "prediction": p}
            for e, p in list(zip(examples, predictions))[:5]
        ],
    }
