"""`lorakit serve` over real HTTP on localhost: OpenAI-compatible completions and chat (plain and
streamed), vLLM's adapter routes, metrics, every kind of bad request answered with a 4xx JSON error
while the server keeps serving, a bounded queue (429), cancellation on disconnect, graceful
shutdown, and 64 concurrent clients with mixed adapters checked against `engine.generate`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import lorakit
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.errors import ShuttingDown
from lorakit.serve.server import build_server
from lorakit.serve.store import AdapterStore

BASE = "tiny-base"
GREEDY = dict(temperature=0, max_tokens=6)
PROMPTS = ["The quick brown fox", "Sort these numbers: 4 1 3", "What is 12 + 30?", "Hello", "Once upon a time",
           "Reverse: apple river stone", "def add(a, b):", "Paris is the capital of"]


# --- fixtures ----------------------------------------------------------------------------------

def _make_adapter(model_folder: Path, out: Path, r: int, targets, seed: int) -> Path:
    """A LoRA whose B is far from zero, so the adapter changes greedy generations."""
    model, _ = lorakit.models.load(model_folder)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if "lora_B" in name else 0.3))
    lorakit.save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def adapter_root(tiny_model_folder, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("serve-http")
    root = work / "adapters"
    _make_adapter(tiny_model_folder, root / "alpha", 4, "all-linear", 1)
    _make_adapter(tiny_model_folder, root / "beta", 8, ["q_proj", "v_proj"], 2)
    _make_adapter(tiny_model_folder, root / "gamma", 2, ["gate_proj", "down_proj"], 3)
    _make_adapter(tiny_model_folder, root / "nested" / "extra", 4, ["o_proj", "up_proj"], 4)  # not a direct sub-folder
    shutil.copytree(root / "alpha", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    _make_adapter(tiny_model_folder, work / "outside" / "evil", 4, "all-linear", 5)
    return root


class Server:
    """`lorakit serve`'s uvicorn server (`build_server`) in a thread on a free localhost port."""

    def __init__(self, engine: Engine, shutdown_timeout: float = 30.0, **limits):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = build_server(engine, shutdown_timeout=shutdown_timeout, log_level="error", **limits)
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[self.sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True  # what SIGINT / SIGTERM do
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def _engine(model_folder: Path, root: Path, **kwargs) -> Engine:
    model, tokenizer = lorakit.models.load(model_folder)
    store = AdapterStore(root, base_model=model)
    # A 4 MiB pool: ample for this model (one cell, a token's K+V, is 256 bytes) and quick to scan.
    return Engine(model, tokenizer, store, model_name=BASE, device_budget_bytes=2**22, **kwargs)


@pytest.fixture(scope="module")
def served(tiny_model_folder, adapter_root):
    engine = _engine(tiny_model_folder, adapter_root, max_batch_size=8, max_queue=128).start()
    server = Server(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    yield SimpleNamespace(engine=engine, url=server.url, client=client, root=adapter_root)
    client.close()
    server.stop()


def _expected(engine: Engine, prompt, adapter: str | None, **params) -> lorakit.serve.engine.Completion:
    return engine.generate(prompt, None if adapter == BASE else adapter, SamplingParams(**params))


def _events(response: httpx.Response) -> list:
    """The server-sent events of a streamed response: parsed JSON objects, then the string '[DONE]'."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def _assert_error(response: httpx.Response, status: int, error_type: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and error["code"] == status
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]


# --- routes ------------------------------------------------------------------------------------

def test_health_and_models_list_base_then_every_adapter_with_parent(served):
    assert served.client.get("/health").status_code == 200
    listing = served.client.get("/v1/models").json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert listing["data"][0]["id"] == BASE and cards[BASE]["parent"] is None
    for name in ("alpha", "beta", "gamma"):
        assert cards[name]["parent"] == BASE and cards[name]["object"] == "model"
    assert "extra" not in cards  # only direct sub-folders are served without load_lora_adapter
    assert cards[BASE]["max_model_len"] == served.engine.max_context


def test_completions_route_each_model_field_to_its_adapter(served):
    texts = {}
    for name in (BASE, "alpha", "beta", "gamma"):
        body = served.client.post("/v1/completions", json=dict(model=name, prompt=PROMPTS[0], **GREEDY)).json()
        expected = _expected(served.engine, PROMPTS[0], name, **GREEDY)
        choice = body["choices"][0]
        assert body["object"] == "text_completion" and body["model"] == name and body["id"].startswith("cmpl-")
        assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
        assert body["usage"] == {"prompt_tokens": expected.prompt_tokens, "completion_tokens": expected.completion_tokens,
                                 "total_tokens": expected.prompt_tokens + expected.completion_tokens}
        texts[name] = expected.token_ids
    assert all(texts[name] != texts[BASE] for name in ("alpha", "beta", "gamma")), "an adapter left the output unchanged"


def test_completions_take_token_ids_and_several_prompts(served):
    ids, more = [5, 17, 99, 3], [8, 8, 41]
    for prompt, singles in ((ids, [ids]), ([ids, more], [ids, more]), (PROMPTS[1:3], PROMPTS[1:3])):
        body = served.client.post("/v1/completions", json=dict(model="alpha", prompt=prompt, **GREEDY)).json()
        assert [c["index"] for c in body["choices"]] == list(range(len(singles)))
        for choice, single in zip(body["choices"], singles):
            assert choice["text"] == _expected(served.engine, single, "alpha", **GREEDY).text


def test_streamed_completion_is_openai_chunks_ending_with_done(served):
    request = dict(model="beta", prompt=PROMPTS[2], stream=True, stream_options={"include_usage": True}, temperature=0, max_tokens=8)
    with served.client.stream("POST", "/v1/completions", json=request) as response:
        assert response.status_code == 200
        events = _events(response)
    expected = _expected(served.engine, PROMPTS[2], "beta", temperature=0, max_tokens=8)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["model"] == "beta" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [expected.finish_reason]
    assert len(chunks) >= 3  # streamed as produced, not in one piece
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == expected.completion_tokens


def test_chat_completions_plain_and_streamed_match_the_engine(served):
    messages = [{"role": "user", "content": "What is 47 + 38?"}]
    expected = _expected(served.engine, served.engine.apply_chat_template(messages), "gamma", temperature=0, max_tokens=8)
    body = served.client.post("/v1/chat/completions", json=dict(model="gamma", messages=messages, temperature=0, max_tokens=8)).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    request = dict(model="gamma", messages=messages, temperature=0, max_completion_tokens=8, stream=True)
    with served.client.stream("POST", "/v1/chat/completions", json=request) as response:
        events = _events(response)
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == expected.text
    assert events[-2]["choices"][0]["finish_reason"] == expected.finish_reason


def test_load_and_unload_lora_adapter_take_vllms_bodies(served):
    client, extra = served.client, str(served.root / "nested" / "extra")
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": extra})
    assert response.status_code == 200 and "extra" in response.text
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": extra}).status_code == 200  # same path: no-op
    _assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(served.root / "alpha")}),
                  409, "invalid_request_error", "extra")
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert cards["extra"]["parent"] == BASE
    body = client.post("/v1/completions", json=dict(model="extra", prompt=PROMPTS[3], **GREEDY)).json()
    assert body["choices"][0]["text"] == _expected(served.engine, PROMPTS[3], "extra", **GREEDY).text
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    _assert_error(client.post("/v1/completions", json=dict(model="extra", prompt="hi", **GREEDY)), 404, "not_found_error", "extra")
    _assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}), 404, "not_found_error", "extra")


BAD_REQUESTS = [
    # (id, path, body (a string is sent as raw bytes), status, error type, words the message must hold)
    ("malformed-json", "/v1/completions", '{"model": "alpha", "prompt": "hi",', 400, "invalid_request_error", ["json"]),
    ("not-an-object", "/v1/completions", "[1, 2]", 400, "invalid_request_error", []),
    ("missing-prompt", "/v1/completions", {"model": "alpha"}, 400, "invalid_request_error", ["prompt"]),
    ("prompt-wrong-type", "/v1/completions", {"prompt": {"a": 1}}, 400, "invalid_request_error", ["prompt"]),
    ("max-tokens-zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "invalid_request_error", ["max_tokens"]),
    ("max-tokens-negative-chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     400, "invalid_request_error", ["max_tokens"]),
    ("max-tokens-not-int", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "invalid_request_error", ["max_tokens"]),
    ("bad-temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "invalid_request_error", ["temperature"]),
    ("prompt-too-long", "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4}, 400, "invalid_request_error", ["context"]),
    ("max-tokens-past-context", "/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "invalid_request_error", ["context"]),
    ("n-above-1", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "invalid_request_error", ["n=2"]),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "invalid_request_error", ["messages"]),
    ("unknown-adapter", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "not_found_error", ["nope"]),
    ("corrupt-adapter", "/v1/completions", {"model": "broken", "prompt": "hi"}, 422, "invalid_request_error", ["broken"]),
    ("load-path-traversal", "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": "ADAPTERS/../outside/evil"},
     403, "permission_error", []),
    ("load-corrupt", "/v1/load_lora_adapter", {"lora_name": "broken2", "lora_path": "ADAPTERS/broken"}, 422, "invalid_request_error", []),
    ("load-missing-field", "/v1/load_lora_adapter", {"lora_name": "x"}, 400, "invalid_request_error", ["lora_path"]),
    ("unknown-route", "/v1/embeddings", {"input": "hi"}, 404, "not_found_error", ["/v1/embeddings"]),
    # text that is not Unicode, bodies that are not UTF-8, numbers past what the sampler takes (500s or hangs before)
    ("lone-surrogate-prompt", "/v1/completions", '{"prompt": "hi \\ud800"}', 400, "invalid_request_error", ["surrogate", "prompt"]),
    ("lone-surrogate-chat", "/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udfff"}]}',
     400, "invalid_request_error", ["surrogate", "messages.0.content"]),
    ("lone-surrogate-model", "/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', 400, "invalid_request_error", ["surrogate"]),
    ("lone-surrogate-stop", "/v1/completions", '{"prompt": "hi", "stop": ["\\udc00"]}', 400, "invalid_request_error", ["surrogate"]),
    ("invalid-utf8", "/v1/completions", b'{"prompt": "hi \xff\xfe"}', 400, "invalid_request_error", ["utf-8"]),
    ("seed-past-the-generator", "/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "invalid_request_error", ["seed"]),
    ("seed-negative-past-int64", "/v1/completions", {"prompt": "hi", "seed": -2**63 - 1}, 400, "invalid_request_error", ["seed"]),
    ("seed-bool", "/v1/completions", {"prompt": "hi", "seed": True}, 400, "invalid_request_error", ["seed"]),
    ("temperature-bool", "/v1/completions", {"prompt": "hi", "temperature": True}, 400, "invalid_request_error", ["temperature"]),
    ("temperature-nan", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "invalid_request_error", ["temperature"]),
    ("top-p-infinite", "/v1/completions", '{"prompt": "hi", "top_p": Infinity}', 400, "invalid_request_error", ["top_p"]),
    ("too-many-stops", "/v1/completions", {"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, 400, "invalid_request_error", ["stop"]),
    ("prompt-over-char-limit", "/v1/completions", {"prompt": "a" * (32 * 256 + 1)}, 400, "invalid_request_error", ["characters"]),
    ("chat-over-char-limit", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 5000}] * 2},
     400, "invalid_request_error", ["characters"]),
]


@pytest.mark.parametrize("path,body,status,error_type,words", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(served, path, body, status, error_type, words):
    if isinstance(body, dict) and "lora_path" in body:
        body = {**body, "lora_path": body["lora_path"].replace("ADAPTERS", str(served.root))}
    if isinstance(body, (str, bytes)):
        response = served.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = served.client.post(path, json=body)
    _assert_error(response, status, error_type, *words)
    assert served.client.get("/health").status_code == 200
    ok = served.client.post("/v1/completions", json=dict(model="alpha", prompt=PROMPTS[0], **GREEDY))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == _expected(served.engine, PROMPTS[0], "alpha", **GREEDY).text


def test_metrics_are_prometheus_text_with_queue_tokens_cache_and_per_adapter_counts(served):
    before = _metrics(served.client)
    for _ in range(3):
        assert served.client.post("/v1/completions", json=dict(model="gamma", prompt=PROMPTS[4], **GREEDY)).status_code == 200
    after = _metrics(served.client)
    assert after[("lorakit_adapter_requests_total", (("adapter", "gamma"),))] == \
        before.get(("lorakit_adapter_requests_total", (("adapter", "gamma"),)), 0) + 3
    assert after[("lorakit_generated_tokens_total", ())] >= before[("lorakit_generated_tokens_total", ())] + 3
    assert after[("lorakit_requests_total", ())] >= before[("lorakit_requests_total", ())] + 3
    for name in ("lorakit_queue_length", "lorakit_running_requests", "lorakit_tokens_per_second", "lorakit_device_adapters",
                 "lorakit_adapter_cache_hits_total", "lorakit_adapter_cache_misses_total", "lorakit_adapter_cache_evictions_total"):
        assert (name, ()) in after, name
    assert after[("lorakit_adapter_cache_hits_total", ())] > before[("lorakit_adapter_cache_hits_total", ())]
    assert after[("lorakit_http_responses_total", (("route", "/v1/completions"), ("status", "200")))] >= 3


def _metrics(client: httpx.Client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_client_disconnect_cancels_its_request(served, streamed):
    """A request whose client goes away while the engine is busy stops at its next token instead of
    generating max_tokens for nobody."""
    engine = served.engine
    before, finished = engine.metrics()["tokens_generated_total"], engine.metrics()["requests_finished"]
    gate, hook = _block_forwards(engine)
    body = dict(model="alpha", prompt=PROMPTS[5], stream=streamed, temperature=0, max_tokens=200, ignore_eos=True)
    try:
        with httpx.Client(base_url=served.url, timeout=httpx.Timeout(30, read=0.5)) as client:
            if streamed:
                with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200 and gate.entered.wait(20)
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post("/v1/completions", json=body)
        time.sleep(0.5)  # the server sees the closed connection while the engine is still held
    finally:
        gate.set()
        hook.remove()
    _wait_until(lambda: engine.metrics()["requests_finished"] > finished)
    assert engine.metrics()["tokens_generated_total"] - before <= 2


def test_a_failing_model_step_fails_only_its_request_with_a_json_error(served):
    def fail_once(*_):
        hook.remove()
        raise RuntimeError("simulated kernel failure")

    for streamed in (False, True):
        hook = served.engine.model.get_input_embeddings().register_forward_pre_hook(fail_once)
        body = dict(model="alpha", prompt=PROMPTS[7], stream=streamed, **GREEDY)
        if streamed:
            with served.client.stream("POST", "/v1/completions", json=body) as response:
                events = _events(response)
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
            assert "simulated kernel failure" in events[-2]["error"]["message"]
        else:
            _assert_error(served.client.post("/v1/completions", json=body), 500, "server_error", "simulated kernel failure")
        ok = served.client.post("/v1/completions", json=body | {"stream": False})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == _expected(served.engine, PROMPTS[7], "alpha", **GREEDY).text


# --- 64 concurrent clients -----------------------------------------------------------------------

def test_64_concurrent_clients_with_mixed_adapters_each_get_the_single_request_answer(served):
    models = [BASE, "alpha", "beta", "gamma"]
    jobs = [(PROMPTS[i % len(PROMPTS)], models[(i // len(PROMPTS) + i) % len(models)], i % 2 == 1) for i in range(64)]
    expected = {(p, m): _expected(served.engine, p, m, **GREEDY) for p, m, _ in jobs}
    assert len(expected) >= 24 and len({m for _, m, _ in jobs}) == 4

    async def one(client: httpx.AsyncClient, prompt: str, model: str, streamed: bool) -> tuple[str, str]:
        body = dict(model=model, prompt=prompt, stream=streamed, **GREEDY)
        if not streamed:
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            return choice["text"], choice["finish_reason"]
        text, finish = "", None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
        return text, finish

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    peak = {"running": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["running"] = max(peak["running"], served.engine.metrics()["running"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answers = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    for (prompt, model, streamed), (text, finish) in zip(jobs, answers):
        want = expected[(prompt, model)]
        assert (text, finish) == (want.text, want.finish_reason), (prompt, model, streamed)
    assert peak["running"] > 1, "the requests were never batched together"


# --- bounded queue, shutdown -------------------------------------------------------------------

def _block_forwards(engine: Engine):
    """Model forwards wait until `gate` is set (gate.entered: one has started), so a test can hold
    the engine inside a step while it fills the queue or shuts the server down."""
    gate = threading.Event()
    gate.entered = threading.Event()

    def hold(*_):
        gate.entered.set()
        gate.wait(30)

    return gate, engine.model.get_input_embeddings().register_forward_pre_hook(hold)


def _wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_full_queue_answers_429_and_every_accepted_request_completes(tiny_model_folder, adapter_root):
    engine = _engine(tiny_model_folder, adapter_root, max_batch_size=1, max_queue=2).start()
    gate, hook = _block_forwards(engine)
    server = Server(engine)
    results: dict[int, httpx.Response] = {}

    def post(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            results[i] = client.post("/v1/completions", json=dict(model="alpha", prompt=PROMPTS[i], **GREEDY))

    threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
    try:
        threads[0].start()
        assert gate.entered.wait(20)  # the first request is inside its prefill, out of the queue
        threads[1].start()
        threads[2].start()
        _wait_until(lambda: engine.metrics()["queue_length"] == 2)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            _assert_error(client.post("/v1/completions", json=dict(model="beta", prompt="hi", **GREEDY)), 429, "rate_limit_error", "queue")
            assert _metrics(client)[("lorakit_rejected_queue_full_total", ())] == 1
            assert _metrics(client)[("lorakit_queue_length", ())] == 2
            assert client.get("/health").status_code == 200
        gate.set()
        for thread in threads:
            thread.join(60)
        hook.remove()
        for i in range(3):
            assert results[i].status_code == 200
            assert results[i].json()["choices"][0]["text"] == _expected(engine, PROMPTS[i], "alpha", **GREEDY).text
    finally:
        gate.set()
        server.stop()


@pytest.mark.parametrize("shutdown_timeout,finish", [(30.0, "length"), (0.3, "cancelled")], ids=["finishes", "times-out"])
def test_shutdown_ends_every_running_stream_cleanly_then_stops_the_engine(tiny_model_folder, adapter_root, shutdown_timeout, finish):
    """Within the shutdown timeout a running stream finishes; past it, it ends with finish_reason
    "cancelled" — either way with its last chunk and [DONE], never a cut connection."""
    engine = _engine(tiny_model_folder, adapter_root).start()
    server = Server(engine, shutdown_timeout=shutdown_timeout)
    expected = _expected(engine, PROMPTS[6], "beta", temperature=0, max_tokens=40)
    gate, hook = _block_forwards(engine)
    request = dict(model="beta", prompt=PROMPTS[6], stream=True, temperature=0, max_tokens=40)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=request) as response:
                assert gate.entered.wait(20)  # the request is in the engine
                server.server.should_exit = True  # what SIGINT / SIGTERM do
                time.sleep(0.6)  # past the short timeout
                gate.set()
                events = _events(response)
    finally:
        gate.set()
        hook.remove()
    server.thread.join(30)
    assert not server.thread.is_alive()
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == finish
    assert text == expected.text if finish == "length" else expected.text.startswith(text)
    with pytest.raises(ShuttingDown):
        engine.submit("hi")


# --- request-body limits on a real server -------------------------------------------------------

def _raw_exchange(port: int, head: str, parts=(), pause: float = 0.0, timeout: float = 20.0) -> bytes:
    """Send `head` and then `parts` (with `pause` seconds between them) on a raw socket, and return
    everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode())
        try:
            for part in parts:
                time.sleep(pause)
                sock.sendall(part)
        except OSError:  # the server answered and closed before the body was sent: that is the point
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _raw_status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _post_head(length: str) -> str:
    return f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{length}\r\n"


@pytest.fixture(scope="module")
def strict_server(tiny_model_folder, adapter_root):
    """A server with a 4 KiB body limit and a 0.5 s body timeout."""
    engine = _engine(tiny_model_folder, adapter_root).start()
    server = Server(engine, max_body_bytes=4096, body_timeout=0.5)
    yield SimpleNamespace(engine=engine, server=server, port=server.port, url=server.url)
    server.stop()


def test_bodies_over_the_byte_limit_get_413_by_length_and_by_counting_chunks(strict_server):
    status, error = _raw_status_and_error(_raw_exchange(strict_server.port, _post_head("Content-Length: 1000000000\r\n")))
    assert status == 413 and error["code"] == 413 and "4096" in error["message"] and "--max-body-bytes" in error["message"]
    chunk = b"400\r\n" + b" " * 1024 + b"\r\n"  # chunked: no Content-Length to check, the bytes are counted
    status, error = _raw_status_and_error(_raw_exchange(strict_server.port, _post_head("Transfer-Encoding: chunked\r\n"), [chunk] * 8))
    assert status == 413 and error["type"] == "invalid_request_error"
    with httpx.Client(base_url=strict_server.url, timeout=30) as client:
        _assert_error(client.post("/v1/completions", content=b" " * 5000, headers={"content-type": "application/json"}),
                      413, "invalid_request_error", "limit")
        ok = client.post("/v1/completions", json=dict(model="alpha", prompt=PROMPTS[0], **GREEDY))  # under the limit
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["text"] == _expected(strict_server.engine, PROMPTS[0], "alpha", **GREEDY).text
        assert _metrics(client)[("lorakit_http_responses_total", (("route", "/v1/completions"), ("status", "413")))] == 3


def test_a_body_that_stalls_or_trickles_gets_408_without_holding_up_anyone(strict_server):
    results: dict[str, bytes] = {}
    started = time.monotonic()
    stalled = threading.Thread(target=lambda: results.update(stalled=_raw_exchange(
        strict_server.port, _post_head("Content-Length: 200\r\n"), [b'{"prompt": "hi", '])))
    trickled = threading.Thread(target=lambda: results.update(trickled=_raw_exchange(
        strict_server.port, _post_head("Content-Length: 200\r\n"), [b" "] * 40, pause=0.05)))
    stalled.start()
    trickled.start()
    with httpx.Client(base_url=strict_server.url, timeout=30) as client:  # served while the two slow bodies hang
        ok = client.post("/v1/completions", json=dict(model="beta", prompt=PROMPTS[1], **GREEDY))
        assert ok.status_code == 200
    stalled.join(30)
    trickled.join(30)
    for name in ("stalled", "trickled"):
        status, error = _raw_status_and_error(results[name])
        assert status == 408 and error["code"] == 408 and "--body-timeout" in error["message"], name
    assert time.monotonic() - started < 10


def test_lorakit_serve_cli_serves_the_adapter_root_and_exits_cleanly_on_ctrl_c(tiny_model_folder, adapter_root):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny_model_folder), "--adapters",
                                str(adapter_root), "--port", str(port), "--served-model-name", BASE, "--device", "cpu",
                                "--max-batch-size", "4", "--device-budget-mb", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, process.stdout.read()
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "lorakit serve did not come up"
                time.sleep(0.2)
            assert {"alpha", "beta", "gamma", BASE} <= {c["id"] for c in client.get("/v1/models").json()["data"]}
            body = client.post("/v1/completions", json=dict(model="alpha", prompt=PROMPTS[0], **GREEDY))
            assert body.status_code == 200 and body.json()["choices"][0]["finish_reason"] in ("length", "stop")
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(60) == 0
        assert "Application shutdown complete" in process.stdout.read()  # the lifespan shut the engine down
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
