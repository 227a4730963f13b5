"""Tests for lorakit.data: record loading, layout detection, encoding, batching, metrics and the
built-in default task. The tokenizer is the real default model's (cached after one conversion)."""

from __future__ import annotations

import csv
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    DataCollator,
    DataFormatError,
    Example,
    default_task,
    encode,
    encode_prompt,
    exact_match,
    load_records,
    normalize_answer,
    to_example,
)

# lorakit.data re-exports the function default_task, which shadows the submodule of the same
# name as a package attribute; import_module fetches the module itself.
default_task_module = importlib.import_module("lorakit.data.default_task")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lorakit.models import default_model_folder

    tok = AutoTokenizer.from_pretrained(default_model_folder(), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --- load_records -----------------------------------------------------------------------------


def test_jsonl_records_load_in_order_and_skip_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    assert load_records(path) == [
        {"prompt": "a", "response": "b"},
        {"prompt": "c", "response": "d"},
    ]


def test_json_list_loads(tmp_path):
    rows = [{"question": "q1", "answer": 1}, {"question": "q2", "answer": 2}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    assert load_records(str(path)) == rows


def test_csv_loads_with_header_and_quoted_commas(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input", "output"])
        writer.writerow(["hello, world", "bonjour"])
    assert load_records(path) == [{"input": "hello, world", "output": "bonjour"}]


def test_tsv_keeps_quote_characters_verbatim(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nit \'s a "great film \t1\n')
    assert load_records(path) == [{"sentence": 'it \'s a "great film ', "label": "1"}]


def test_folder_split_picks_the_file_and_aliases_dev_to_validation(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "t", "response": "1"}\n')
    (tmp_path / "dev.jsonl").write_text('{"prompt": "d", "response": "2"}\n')
    assert load_records(tmp_path)[0]["prompt"] == "t"  # split=None means train
    assert load_records(tmp_path, split="train")[0]["prompt"] == "t"
    assert load_records(tmp_path, split="validation")[0]["prompt"] == "d"
    with pytest.raises(ValueError, match="dev.jsonl, train.jsonl"):
        load_records(tmp_path, split="test")


def test_bad_json_line_error_names_path_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl.*line 2"):
        load_records(path)


def test_json_that_is_not_a_list_errors(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"prompt": "a"}')
    with pytest.raises(DataFormatError, match="expected a list of objects"):
        load_records(path)


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_hf_dataset_name_without_datasets_package_explains_the_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def import_without_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_without_datasets)
    with pytest.raises(FileNotFoundError, match=r"some_hub_dataset.*`datasets` package"):
        load_records("some_hub_dataset")


def test_split_on_single_file_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(ValueError, match="single file"):
        load_records(path, split="train")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
def test_shared_gsm8k_folder_loads_both_splits_as_question_answer():
    train = load_records(SHARED_DATA / "gsm8k", split="train")
    test = load_records(SHARED_DATA / "gsm8k", split="test")
    assert (len(train), len(test)) == (7473, 1319)
    example = to_example(test[0])
    assert example.messages[-1]["role"] == "user"
    assert "####" in example.response


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent")
def test_shared_alpaca_and_tsv_folders_load():
    alpaca = load_records(SHARED_DATA / "code_alpaca_2k")
    assert len(alpaca) == 2017
    assert to_example(alpaca[0]).response == alpaca[0]["output"]
    rte = load_records(SHARED_DATA / "rte", split="dev")
    assert len(rte) == 277
    assert set(rte[0]) == {"index", "sentence1", "sentence2", "label"}


# --- to_example -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "prompt", "response"),
    [
        ({"prompt": "p", "response": "r"}, "p", "r"),
        ({"prompt": "p", "completion": "r"}, "p", "r"),
        ({"question": "p", "answer": 42}, "p", "42"),
        ({"input": "p", "output": "r"}, "p", "r"),
        ({"instruction": "do", "input": "", "output": "r"}, "do", "r"),
        ({"instruction": "do", "input": "this", "output": "r"}, "do\n\nthis", "r"),
        ({"instruction": "do", "output": "r"}, "do", "r"),
    ],
)
def test_pair_layouts_become_one_user_turn(record, prompt, response):
    assert to_example(record) == Example([{"role": "user", "content": prompt}], response)


def test_system_field_becomes_system_message():
    example = to_example({"system": "be brief", "prompt": "p", "response": "r"})
    assert example.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "p"},
    ]


def test_messages_layout_uses_last_assistant_turn_as_response():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    example = to_example({"messages": messages})
    assert example.messages == messages[:-1]
    assert example.response == "a2"


def test_messages_not_ending_with_assistant_errors():
    with pytest.raises(DataFormatError, match="last message"):
        to_example({"messages": [{"role": "user", "content": "hi"}]})


def test_explicit_fields_override_detection():
    record = {"sentence": "great", "label": 1}
    example = to_example(record, prompt_field="sentence", response_field="label")
    assert example == Example([{"role": "user", "content": "great"}], "1")


def test_unknown_layout_error_lists_fields_found_and_accepted_layouts():
    with pytest.raises(DataFormatError) as raised:
        to_example({"sentence1": "a", "sentence2": "b", "label": "entailment"})
    message = str(raised.value)
    for field in ("'sentence1'", "'sentence2'", "'label'"):
        assert field in message
    for layout in ("messages", "instruction", "prompt + response", "question + answer"):
        assert layout in message


# --- encode / collate -------------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_tokens(tokenizer):
    example = to_example({"prompt": "Sort: 3 1 2", "response": "1 2 3"})
    encoded = encode(tokenizer, example, max_length=128)
    prompt_ids = encode_prompt(tokenizer, example)
    n_prompt = len(prompt_ids)
    assert encoded["input_ids"][:n_prompt] == prompt_ids
    assert encoded["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in encoded["labels"][n_prompt:]
    labelled = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "1 2 3" + tokenizer.eos_token
    assert encoded["labels"][n_prompt:] == encoded["input_ids"][n_prompt:]
    assert encoded["attention_mask"] == [1] * len(encoded["input_ids"])


def test_prompt_follows_chat_template_with_generation_prompt(tokenizer):
    example = to_example({"prompt": "hi", "response": "hello"})
    text = tokenizer.decode(encode_prompt(tokenizer, example))
    expected = tokenizer.apply_chat_template(
        example.messages, add_generation_prompt=True, tokenize=False
    )
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n")


def test_truncation_drops_prompt_from_the_left_and_keeps_the_response(tokenizer):
    example = to_example({"prompt": "word " * 50, "response": "the answer"})
    full = encode(tokenizer, example, max_length=1000)
    cut = encode(tokenizer, example, max_length=20)
    assert len(cut["input_ids"]) == 20
    assert cut["input_ids"] == full["input_ids"][-20:]
    assert cut["labels"] == full["labels"][-20:]


def test_response_longer_than_max_length_errors(tokenizer):
    example = to_example({"prompt": "p", "response": "many words " * 20})
    with pytest.raises(ValueError, match="max_length=10"):
        encode(tokenizer, example, max_length=10)


def test_plain_text_fallback_without_chat_template(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    example = to_example({"prompt": "Question?", "response": "Yes"})
    encoded = encode(tokenizer, example, max_length=64)
    assert tokenizer.decode(encoded["input_ids"]) == "Question?\nYes" + tokenizer.eos_token


def test_collator_right_pads_ids_labels_and_mask():
    collate = DataCollator(pad_token_id=0)
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
            {"input_ids": [8], "labels": [8], "attention_mask": [1]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_left_pads_prompts_for_generation(tokenizer):
    collate = DataCollator.from_tokenizer(tokenizer, padding_side="left")
    batch = collate(
        [{"input_ids": [5, 6], "attention_mask": [1, 1]}, {"input_ids": [7], "attention_mask": [1]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6], [tokenizer.pad_token_id, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert "labels" not in batch


def test_collated_batch_gives_loss_only_on_responses(tokenizer):
    """End to end: records -> examples -> encoded -> batch keeps exactly the response tokens."""
    records = [
        {"prompt": "a", "response": "x"},
        {"prompt": "a much longer prompt here", "response": "y z"},
    ]
    encoded = [encode(tokenizer, to_example(r), max_length=64) for r in records]
    batch = DataCollator.from_tokenizer(tokenizer)(encoded)
    for row, record in zip(batch["labels"], records):
        kept = row[row != IGNORE_INDEX].tolist()
        assert tokenizer.decode(kept) == record["response"] + tokenizer.eos_token


# --- exact_match ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("42", "42"),
        ("  Paris. ", "paris"),
        ("The   answer\tis 7", "the answer is 7"),
        ("12 30 47\nbecause sorting ...", "12 30 47"),
        ("\n\nstone\n", "stone"),
    ],
)
def test_exact_match_normalises_case_space_period_and_keeps_first_line(prediction, reference):
    assert exact_match(prediction, reference)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("42 apples", "42"), ("4 2", "42"), ("", "42"), ("because\n42", "42")],
)
def test_exact_match_rejects_other_answers(prediction, reference):
    assert not exact_match(prediction, reference)


def test_normalize_answer_drops_trailing_periods_only():
    assert normalize_answer(" 3.5. ") == "3.5"
    assert normalize_answer("A.B") == "a.b"


# --- default task -----------------------------------------------------------------------------


def test_default_task_is_deterministic_for_a_seed():
    assert default_task(200, 50, seed=3) == default_task(200, 50, seed=3)
    assert default_task(200, 50, seed=3) != default_task(200, 50, seed=4)


def test_default_task_train_and_eval_prompts_are_disjoint_and_unique():
    train, evaluation = default_task(2000, 300, seed=0)
    train_prompts = [r["prompt"] for r in train]
    eval_prompts = [r["prompt"] for r in evaluation]
    assert len(set(train_prompts)) == len(train_prompts) == 2000
    assert len(set(eval_prompts)) == len(eval_prompts) == 300
    assert not set(train_prompts) & set(eval_prompts)


def test_default_task_split_is_a_function_of_the_prompt_across_seeds():
    """A prompt is held out for every seed or for none, so no seed can leak eval into train."""
    train_a, eval_a = default_task(3000, 600, seed=1)
    train_b, eval_b = default_task(3000, 600, seed=2)
    assert not {r["prompt"] for r in train_a} & {r["prompt"] for r in eval_b}
    assert not {r["prompt"] for r in train_b} & {r["prompt"] for r in eval_a}


def _solve_default_task_prompt(prompt: str) -> str:
    """Independent reference solver: parse a default-task prompt and compute its answer."""
    if match := re.fullmatch(r"Sort these numbers in ascending order: ([\d ]+)", prompt):
        return " ".join(map(str, sorted(int(n) for n in match.group(1).split())))
    if match := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(match.group(1)) + int(match.group(2)))
    if match := re.fullmatch(r"Reverse the order of these words: ([a-z ]+)", prompt):
        return " ".join(match.group(1).split()[::-1])
    raise AssertionError(f"unexpected default-task prompt {prompt!r}")


def test_default_task_answers_follow_their_rules():
    train, evaluation = default_task(300, 100, seed=0)
    templates = set()
    for record in train + evaluation:
        templates.add(record["template"])
        prompt, response = record["prompt"], record["response"]
        to_example(record)  # every record is in an accepted layout
        assert response == _solve_default_task_prompt(prompt)
    assert templates == set(default_task_module.TEMPLATES)


def test_default_task_records_fit_recommended_lengths(tokenizer):
    """Training never truncates a default-task record, and generation has room for every answer."""
    train, evaluation = default_task(300, 100, seed=0)
    recommended = default_task_module.RECOMMENDED
    for record in train + evaluation:
        encoded = encode(tokenizer, to_example(record), max_length=10_000)
        n_answer = sum(label != IGNORE_INDEX for label in encoded["labels"])  # response + eos
        assert len(encoded["input_ids"]) <= recommended["max_length"], record
        assert n_answer <= recommended["max_new_tokens"], record
