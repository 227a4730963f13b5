"""Quick start: adapt the embedded default model, take a few training steps, save, reload in PEFT.

Run: .venv/bin/python examples/quickstart.py
"""

import tempfile

import torch

import lorakit
from lorakit.data import DataCollator, default_task, encode, to_example

model, tokenizer = lorakit.models.load()
lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
trainable, total = lorakit.trainable_parameters(model)
print(f"trainable {trainable:,} of {total:,}")

train_records, _ = default_task()
examples = [encode(tokenizer, to_example(r), max_length=128) for r in train_records[:32]]
collate = DataCollator.from_tokenizer(tokenizer)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
model.train()
for step in range(4):
    batch = collate(examples[step * 8:(step + 1) * 8])
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

with tempfile.TemporaryDirectory() as folder:
    lorakit.save_adapter(model, folder)
    base, _ = lorakit.models.load()
    try:
        import peft

        peft_model = peft.PeftModel.from_pretrained(base, folder)
        print("PEFT loaded the adapter:", type(peft_model).__name__)
    except ImportError:
        print("install peft to load the adapter in PEFT")
