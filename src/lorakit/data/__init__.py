"""Datasets for lorakit: read records, map them to chat examples, tokenize, batch, score.

Typical use::

    records = load_records("data/gsm8k", split="train")      # list[dict]
    examples = [to_example(r) for r in records]              # chat prompt + response
    encoded = [encode(tokenizer, e, max_length=256) for e in examples]
    batch = DataCollator.from_tokenizer(tokenizer)(encoded[:16])  # padded torch tensors

``default_task()`` generates lorakit's built-in training task (see ``lorakit.data.default_task``).
"""

from lorakit.data.default_task import RECOMMENDED, default_task
from lorakit.data.encode import IGNORE_INDEX, DataCollator, encode, encode_prompt
from lorakit.data.format import DataFormatError, Example, to_example
from lorakit.data.metrics import exact_match, normalize_answer
from lorakit.data.records import load_records

__all__ = [
    "IGNORE_INDEX",
    "RECOMMENDED",
    "DataCollator",
    "DataFormatError",
    "Example",
    "default_task",
    "encode",
    "encode_prompt",
    "exact_match",
    "load_records",
    "normalize_answer",
    "to_example",
]
