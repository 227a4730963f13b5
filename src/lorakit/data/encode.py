"""Tokenize ``Example``s for causal-LM fine-tuning and pad them into batches.

A training sequence is ``prompt tokens + response tokens + eos``. The prompt tokens come from the
tokenizer's chat template with the generation prompt appended (for SmolLM2:
``<|im_start|>system ... <|im_end|> <|im_start|>user ... <|im_end|> <|im_start|>assistant\\n``),
so training sees exactly what generation will see. Labels are ``-100`` on every prompt token:
the loss falls only on the response and the closing eos, which teaches the model when to stop.

Tokenizers without a chat template fall back to plain text: the prompt messages' contents joined
by blank lines, followed by one newline (``"<prompt>\\n"``), tokenized with the tokenizer's usual
special tokens (e.g. BOS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorakit.data.format import Example

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and HF models) skip in the loss."""


def encode_prompt(tokenizer, example: Example) -> list[int]:
    """Return the token ids of ``example``'s prompt, ending where the model starts answering.

    Uses ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` when the tokenizer
    has a chat template, else the plain-text fallback described in the module docstring. Not
    truncated; ``encode`` truncates.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            example.messages, add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list.
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n\n".join(m["content"] for m in example.messages) + "\n"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode(tokenizer, example: Example, max_length: int) -> dict[str, list[int]]:
    """Tokenize ``example`` for training: prompt + response + eos, loss only on the response.

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        example: the prompt messages and the response.
        max_length: maximum total number of tokens. Over-long examples lose prompt tokens from
            the left (the start of the system prompt goes first); the response is never cut,
            because a truncated target would teach the model to stop mid-answer.

    Returns:
        ``{"input_ids", "labels", "attention_mask"}``, equal-length lists of ints, with
        ``labels[i] == -100`` exactly on the prompt tokens.

    Raises:
        ValueError: the tokenizer has no eos token, or the response plus eos leaves no room for
            at least one prompt token within ``max_length``.
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            "The tokenizer has no eos token, so the model could not learn where a response ends; "
            "set tokenizer.eos_token before encoding."
        )
    prompt_ids = encode_prompt(tokenizer, example)
    # Tokenized on its own, without BOS, exactly as the model will emit it after the prompt.
    response_ids = list(tokenizer(example.response, add_special_tokens=False)["input_ids"])
    response_ids.append(eos_id)
    room_for_prompt = max_length - len(response_ids)
    if room_for_prompt < 1:
        raise ValueError(
            f"The response is {len(response_ids)} tokens including eos, which leaves no room "
            f"for the prompt within max_length={max_length}. Raise max_length above "
            f"{len(response_ids)} or shorten the response (it starts: {example.response[:80]!r})."
        )
    prompt_ids = prompt_ids[-room_for_prompt:]
    input_ids = prompt_ids + response_ids
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "attention_mask": [1] * len(input_ids),
    }


@dataclass
class DataCollator:
    """Pad encoded examples to the longest one in the batch and stack them into tensors.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with ``-100`` (no loss) and
    ``attention_mask`` with 0. Keys missing from the examples are skipped, so prompt-only dicts
    (``{"input_ids", "attention_mask"}``) collate too.

    Attributes:
        pad_token_id: id used to pad ``input_ids`` (``tokenizer.pad_token_id``).
        padding_side: ``"right"`` for training (the default); ``"left"`` for batched generation,
            so every prompt ends at the last column where generation continues.
    """

    pad_token_id: int
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None; give the tokenizer a pad token "
                "(lorakit.models.load does)."
            )

    @classmethod
    def from_tokenizer(cls, tokenizer, padding_side: str = "right") -> DataCollator:
        """Build a collator that pads with ``tokenizer.pad_token_id``."""
        return cls(pad_token_id=tokenizer.pad_token_id, padding_side=padding_side)

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Cannot collate an empty batch.")
        longest = max(len(e["input_ids"]) for e in examples)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {}
        for key, pad_value in pad_values.items():
            if key not in examples[0]:
                continue
            rows = []
            for example in examples:
                values = list(example[key])
                padding = [pad_value] * (longest - len(values))
                rows.append(values + padding if self.padding_side == "right" else padding + values)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch
