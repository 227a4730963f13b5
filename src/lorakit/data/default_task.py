"""lorakit's built-in default task: sort numbers, add numbers, reverse words; bare answers.

``lorakit train`` without arguments fine-tunes the embedded SmolLM2-135M-Instruct on this task,
so it has to show, within a few CPU minutes, that LoRA training taught the model something.
Each record is one of three procedurally generated instructions, picked at random:

=========  ==============================================================  =====================
template   prompt                                                          response
=========  ==============================================================  =====================
sort       ``Sort these numbers in ascending order: 47 12 89 30``          ``12 30 47 89``
add        ``What is 47 + 38?``                                            ``85``
reverse    ``Reverse the order of these words: apple river stone``         ``stone river apple``
=========  ==============================================================  =====================

Numbers are two-digit (10-99); lists hold 3-5 distinct items; words come from a fixed list of
40 common nouns. Exact match is judged by ``lorakit.data.exact_match``.

Why this task (measured on two shared CPU cores, LoRA r=16, alpha=32 on all linear layers,
``RECOMMENDED`` settings, 100 held-out records, greedy decoding, 16 new tokens at most):

* The untrained model scores 0 %: it answers in sentences ("To sort these numbers in ascending
  order, we can use the built-in Python ...", "To add 99 and 79, we need to ..."). Even with
  three solved examples in its prompt, it gets 0-7 % per template.
* After 96 steps of batch 8 (about 3 minutes at ~1.9 s/step) it scores about 80 %
  (seed 0: sort 85 %, add 62 %, reverse 93 %; eval loss 2.08 -> 0.08).
* Format alone does not explain that. A control run trained identically on answers with the
  right shape but wrong content (shuffled lists, random sums) learned the format perfectly and
  scored 0.8 % -- so the ~80 % measures the rules: ordering, carrying digits, reversing.
  Addition is the hardest template; its remaining errors are mostly dropped carries.
* Prompts and answers are short (at most 67 tokens including the chat template's ~20-token
  default system prompt), which keeps each step cheap.
* Answers are unique and exact, so exact-match accuracy is an honest metric.

Train and evaluation records never overlap: all records come from one seeded generator, duplicate
prompts are dropped, and a prompt goes to the evaluation split if and only if a hash of its text
falls in the evaluation bucket (``EVAL_BUCKET_PERCENT``). The split is thus a function of the
prompt alone, the same for every seed, and ``default_task`` asserts disjointness before returning.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

__all__ = ["RECOMMENDED", "TEMPLATES", "default_task"]

RECOMMENDED = dict(
    steps=96,
    batch_size=8,
    lr=2e-3,
    warmup_steps=3,
    max_length=96,
    max_new_tokens=16,
)
"""Training settings measured for the default task (LoRA r=16, alpha=32, all linear layers
but lm_head, AdamW without weight decay, gradient clipping at 1.0, linear warm-up then cosine
decay to 0). Batch 8 for 96 steps beat batch 16 for 48 steps at equal compute (80 % vs 77 %
exact match), and lr 3e-3 did worse than 2e-3 (73 % vs 77 % at batch 16). ``max_length`` leaves
room above the longest record (67 tokens); ``max_new_tokens`` above the longest answer (~15)."""

EVAL_BUCKET_PERCENT = 20
"""Percent of the prompt-hash space reserved for evaluation prompts."""

_WORDS = (
    "apple river stone cloud tiger lemon piano candle rocket garden mirror pencil forest window "
    "bottle castle dragon island jacket kettle ladder magnet needle orange pillow rabbit saddle "
    "ticket violin wallet yacht zebra anchor basket camera desert engine feather guitar hammer"
).split()


def _sort_numbers(rng: random.Random) -> dict:
    numbers = rng.sample(range(10, 100), rng.randint(3, 5))
    return {
        "prompt": f"Sort these numbers in ascending order: {' '.join(map(str, numbers))}",
        "response": " ".join(map(str, sorted(numbers))),
    }


def _add_numbers(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"What is {a} + {b}?", "response": str(a + b)}


def _reverse_words(rng: random.Random) -> dict:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return {
        "prompt": f"Reverse the order of these words: {' '.join(words)}",
        "response": " ".join(reversed(words)),
    }


TEMPLATES: dict[str, Callable[[random.Random], dict]] = {
    "sort": _sort_numbers,
    "add": _add_numbers,
    "reverse": _reverse_words,
}
"""The task's instruction templates; each draws one ``{"prompt", "response"}`` record."""


def _is_eval_prompt(prompt: str) -> bool:
    """True when ``prompt`` belongs to the evaluation split (a fixed function of its text)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return bucket < EVAL_BUCKET_PERCENT


def default_task(
    n_train: int = 1000, n_eval: int = 100, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Generate the default task's train and evaluation records.

    Args:
        n_train: number of training records. ``RECOMMENDED`` training draws
            ``steps * batch_size`` = 768 of them, so each is seen at most once.
        n_eval: number of held-out evaluation records.
        seed: seed of the single generator all records come from; the same seed always gives
            the same records in the same order.

    Returns:
        ``(train, eval)`` lists of ``{"prompt": str, "response": str, "template": str}``;
        no prompt appears twice, and no evaluation prompt appears in training.
    """
    if n_train < 0 or n_eval < 0:
        raise ValueError(
            f"n_train and n_eval must be >= 0, got n_train={n_train}, n_eval={n_eval}."
        )
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    seen: set[str] = set()
    train: list[dict] = []
    evaluation: list[dict] = []
    # The template spaces hold well over 100,000 distinct prompts, so this ends quickly; the cap
    # only turns an impossible request into an error instead of an endless loop.
    max_draws = 50 * (n_train + n_eval) + 1000
    for _ in range(max_draws):
        if len(train) >= n_train and len(evaluation) >= n_eval:
            break
        name = rng.choice(names)
        record = TEMPLATES[name](rng)
        if record["prompt"] in seen:
            continue
        seen.add(record["prompt"])
        record["template"] = name
        split = evaluation if _is_eval_prompt(record["prompt"]) else train
        limit = n_eval if split is evaluation else n_train
        if len(split) < limit:
            split.append(record)
    if len(train) < n_train or len(evaluation) < n_eval:
        raise ValueError(
            f"Could not draw {n_train} train and {n_eval} eval distinct prompts in "
            f"{max_draws} draws (got {len(train)} and {len(evaluation)}); ask for fewer records."
        )
    overlap = {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert not overlap, f"train/eval overlap in the default task: {sorted(overlap)[:3]}"
    return train, evaluation
