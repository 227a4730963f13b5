"""Calibration batches and held-out perplexity for the quantizers (built on `lorakit.data`)."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from lorakit.data import DataCollator, encode_prompt, to_example


def calibration_batches(tokenizer, records: list[dict], samples: int = 8, max_length: int = 128,
                        batch_size: int = 1, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`samples` records drawn with `seed`, each as its chat prompt + response tokens (cut to `max_length`),
    padded into batches of {'input_ids', 'attention_mask', 'labels'}."""
    chosen = random.Random(seed).sample(list(records), min(samples, len(records)))
    encoded = []
    for record in chosen:
        example = to_example(record)
        ids = encode_prompt(tokenizer, example) + list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
        ids = ids[:max_length]
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    collate = DataCollator.from_tokenizer(tokenizer)
    return [collate(encoded[i:i + batch_size]) for i in range(0, len(encoded), batch_size)]


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over every token of `texts` (each cut to `max_length` tokens)."""
    device = next(model.parameters()).device
    collate = DataCollator.from_tokenizer(tokenizer)
    encoded = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
               for ids in (tokenizer(t, add_special_tokens=True)["input_ids"][:max_length] for t in texts)]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / max(count, 1))
