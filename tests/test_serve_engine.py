"""The serving engine: continuous batching with mixed adapters gives every request exactly what it
would get alone (greedy, against a cache-free reference loop with the adapter loaded by lorakit)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.errors import InvalidRequest, PromptTooLong, QueueFull, ShuttingDown, UnknownAdapter
from lorakit.serve.store import AdapterStore

ADAPTERS = {  # name: (config, seed)
    "sorter": (dict(r=4, alpha=8, target_modules="all-linear"), 1),
    "qv": (dict(r=8, alpha=8, target_modules=["q_proj", "v_proj"]), 2),
    "tiny-rank": (dict(r=1, alpha=4, target_modules=["o_proj", "down_proj"], use_rslora=True), 3),
}


@pytest.fixture(scope="module")
def served(tiny_model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, (fields, seed) in ADAPTERS.items():
        model = LlamaForCausalLM.from_pretrained(tiny_model_folder)
        lorakit.inject(model, lorakit.LoraConfig(**fields))
        torch.manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name or "lora_b" in param_name.lower():
                    param.normal_(0, 0.5)
        lorakit.save_adapter(model, root / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder)
    return tiny_model_folder, root, tokenizer


def make_engine(served, **options) -> Engine:
    folder, root, tokenizer = served
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    return Engine(model, tokenizer, AdapterStore(root), **options)


def reference(served, prompt_ids: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    """Greedy tokens from a full forward over prompt + generated at every step (no cache, no batching)."""
    folder, root, _ = served
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    if adapter is not None:
        lorakit.load_adapter(model, root / adapter)
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


PROMPTS = ["Sort these numbers: 47 12 89", "Hi", "What is 47 + 38? Answer briefly, please, with one number.",
           "Reverse: apple river stone", "The quick brown fox", "1 2 3 4 5 6 7"]
ROW_ADAPTERS = ["sorter", "qv", None, "tiny-rank", "sorter", "qv"]


def test_mixed_adapters_joining_mid_flight_match_each_request_alone(served):
    _, _, tokenizer = served
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    with make_engine(served, max_batch_size=8) as engine:
        first = [engine.submit(PROMPTS[i], ROW_ADAPTERS[i], greedy) for i in range(3)]
        deadline = time.time() + 30
        while all(h.first_token_at is None for h in first) and time.time() < deadline:
            time.sleep(0.005)
        later = [engine.submit(PROMPTS[i], ROW_ADAPTERS[i], greedy) for i in range(3, 6)]
        results = [h.result(timeout=60) for h in first + later]
    for prompt, adapter, completion in zip(PROMPTS, ROW_ADAPTERS, results):
        ids = tokenizer.encode(prompt)
        assert completion.token_ids == reference(served, ids, adapter, 6), (prompt, adapter)
        assert completion.finish_reason == "length" and completion.completion_tokens == 6
        assert completion.prompt_tokens == len(ids)
    # the adapters change the output, so the comparison above can tell them apart
    assert reference(served, tokenizer.encode(PROMPTS[0]), None, 6) != results[0].token_ids


def test_streamed_chunks_join_to_the_text_and_stop_strings_cut_it(served):
    _, _, tokenizer = served
    with make_engine(served) as engine:
        full = engine.generate(PROMPTS[0], "sorter", SamplingParams(max_tokens=8, ignore_eos=True))
        handle = engine.submit(PROMPTS[0], "sorter", SamplingParams(max_tokens=8, ignore_eos=True))
        assert "".join(handle) == handle.result().text == full.text
        stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
        assert stop.strip(), full.text
        cut = engine.submit(PROMPTS[0], "sorter", SamplingParams(max_tokens=8, ignore_eos=True, stop=(stop,)))
        streamed = "".join(cut)
        completion = cut.result()
    assert completion.finish_reason == "stop"
    assert completion.text == full.text[: full.text.find(stop)] == streamed
    assert stop not in completion.text


def test_sampling_is_reproducible_with_a_seed(served):
    with make_engine(served) as engine:
        params = dict(max_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True)
        a = engine.submit("Hello", "qv", SamplingParams(seed=7, **params))
        b = engine.submit("Hello", "qv", SamplingParams(seed=7, **params))
        c = engine.submit("Hello", "qv", SamplingParams(seed=8, **params))
        a, b, c = a.result(60), b.result(60), c.result(60)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_bad_requests_are_refused_at_submit_with_the_reason(served):
    engine = make_engine(served, max_queue=2)
    with pytest.raises(UnknownAdapter, match="nope"):
        engine.submit("Hi", "nope")
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit("Hi", None, SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(PromptTooLong, match="context"):
        engine.submit([5] * 250, None, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequest, match="prompt"):
        engine.submit([], None)
    engine.submit("Hi", None)
    engine.submit("Hi", "qv")
    with pytest.raises(QueueFull, match="full"):  # the loop is not started: the queue stays full
        engine.submit("Hi", None)
    engine.shutdown(graceful=False)
    with pytest.raises(ShuttingDown):
        engine.submit("Hi", None)


def test_a_small_device_budget_evicts_idle_adapters_and_still_serves_everyone(served):
    _, _, tokenizer = served
    probe = make_engine(served)
    largest = max(probe.store.get(name).nbytes for name in ADAPTERS)
    longest = max(len(tokenizer.encode(p)) for p in PROMPTS[:4]) + 3
    budget = (probe.pool.cells_for_bytes(largest) + longest) * probe.pool.cell_bytes  # the largest adapter + one request
    engine = make_engine(served, max_adapters_per_step=1, max_batch_size=4, device_budget_bytes=budget)
    greedy = SamplingParams(max_tokens=3, ignore_eos=True)
    with engine:
        handles = [engine.submit(PROMPTS[i % 4], ROW_ADAPTERS[i % 4], greedy) for i in range(8)]
        results = [h.result(timeout=60) for h in handles]
        metrics = engine.metrics()
    for i, completion in enumerate(results):
        assert completion.token_ids == reference(served, tokenizer.encode(PROMPTS[i % 4]), ROW_ADAPTERS[i % 4], 3)
    assert metrics["device_adapter_evictions"] >= 2
    assert metrics["pool_free_cells"] + sum(engine.pool.owners().values()) == engine.pool.cells
    assert all(not owner.startswith("req-") for owner in engine.pool.owners())  # every request gave its cells back
    assert metrics["per_adapter_requests"]["sorter"] == 2 and metrics["requests_finished"] == 8


def test_cancel_and_shutdown_finish_every_handle(served):
    engine = make_engine(served, max_batch_size=2).start()
    long = SamplingParams(max_tokens=200, ignore_eos=True)
    running = engine.submit("Hi", "qv", long)
    while running.first_token_at is None:
        time.sleep(0.005)
    running.cancel()
    assert running.result(timeout=30).finish_reason == "cancelled"
    handles = [engine.submit("Hi", None, long) for _ in range(4)]
    engine.shutdown(graceful=False)
    reasons = {h.result(timeout=30).finish_reason for h in handles}
    assert reasons == {"cancelled"}


def test_graceful_shutdown_finishes_queued_requests(served):
    engine = make_engine(served, max_batch_size=2).start()
    handles = [engine.submit("Hi", "sorter", SamplingParams(max_tokens=4, ignore_eos=True)) for _ in range(5)]
    engine.shutdown(graceful=True, timeout=60)
    assert [h.result(timeout=1).completion_tokens for h in handles] == [4] * 5


def test_astream_delivers_the_same_text_from_asyncio(served):
    import asyncio

    with make_engine(served) as engine:
        expected = engine.generate("Hello", "qv", SamplingParams(max_tokens=5, ignore_eos=True)).text

        async def stream():
            handle = engine.submit("Hello", "qv", SamplingParams(max_tokens=5, ignore_eos=True))
            return "".join([chunk async for chunk in handle.astream()]), (await handle.aresult()).text

        streamed, final = asyncio.run(stream())
    assert streamed == final == expected


def test_many_threads_submitting_at_once(served):
    _, _, tokenizer = served
    results: dict[int, list[int]] = {}
    with make_engine(served, max_batch_size=8, max_adapters_per_step=3) as engine:
        def client(i):
            results[i] = engine.generate(PROMPTS[i % 6], ROW_ADAPTERS[i % 6],
                                         SamplingParams(max_tokens=3, ignore_eos=True), timeout=120).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    expected = {i: reference(served, tokenizer.encode(PROMPTS[i]), ROW_ADAPTERS[i], 3) for i in range(6)}
    assert all(results[i] == expected[i % 6] for i in range(16))
