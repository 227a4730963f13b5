"""Adapter families: train a few steps with each, save, reload, and export to a plain LoRA.

Every family goes through the same calls (inject, train, save_adapter, load_adapter); the export
turns any of them into a standard PEFT LoRA by truncated SVD of each layer's update.

Run: .venv/bin/python examples/families.py
"""

import copy
import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit.data import DataCollator, default_task, encode, to_example
from lorakit.export import export_adapter

TARGETS = ["q_proj"]  # one projection per block keeps this example quick
FAMILIES = {
    "VeRA": lorakit.VeraConfig(r=64, target_modules=TARGETS),
    "RandLoRA": lorakit.RandLoraConfig(r=32, alpha=64, target_modules=TARGETS),
    "LoLDU": lorakit.LolduConfig(r=16, target_modules=TARGETS),
    "DiffuseKronA": lorakit.KronConfig(a1=64, a2=8, target_modules=TARGETS),
}

base, tokenizer = lorakit.models.load()
train_records, _ = default_task()
examples = [encode(tokenizer, to_example(r), max_length=96) for r in train_records[:8]]
batch = DataCollator.from_tokenizer(tokenizer)(examples)

for label, config in FAMILIES.items():
    model = lorakit.inject(copy.deepcopy(base), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    with tempfile.TemporaryDirectory() as folder:
        lorakit.save_adapter(model, Path(folder) / "adapter")
        reloaded = lorakit.load_adapter(copy.deepcopy(base), Path(folder) / "adapter")
        with torch.no_grad():
            gap = (reloaded(**batch).logits - expected).abs().max().item()
        report = export_adapter(copy.deepcopy(base), Path(folder) / "adapter", Path(folder) / "lora", rank=16)
    trainable, _ = lorakit.trainable_parameters(model)
    print(f"{label}: {trainable:,} trainable, loss {loss.item():.3f}, reload gap {gap:.1e}, "
          f"export to LoRA r=16: max relative error {report.max_error:.3f}")
