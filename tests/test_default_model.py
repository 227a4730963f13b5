"""The real embedded default model (SmolLM2-135M-Instruct): one training step, one generation."""

from __future__ import annotations

import torch

import lorakit
from lorakit.data import DataCollator, Example, encode
from lorakit.train import generate_responses


def test_default_model_trains_one_step_and_generates():
    model, tokenizer = lorakit.models.load()
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    trainable, total = lorakit.trainable_parameters(model)
    assert 0 < trainable < total // 50
    example = Example(messages=[{"role": "user", "content": "Say hello."}], response="Hello!")
    batch = DataCollator.from_tokenizer(tokenizer)([encode(tokenizer, example, 64)] * 2)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = {name for name, p in params.items() if not torch.equal(before[name], p)}
    assert {name for name in params if "lora_B" in name} <= changed  # B gets gradient (A is non-zero)
    reply = generate_responses(model, tokenizer, [example], max_new_tokens=8)[0]
    assert isinstance(reply, str) and reply.strip()
