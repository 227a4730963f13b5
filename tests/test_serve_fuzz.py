"""Property-based fuzzing of `lorakit serve`'s request fields (hypothesis), over real HTTP on
localhost: whatever a client puts in a body, it gets a well-formed answer, and a request running
beside it at the same time gets exactly its single-request answer; once idle, no pool cell is still
held by a request."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.serve.engine import SamplingParams
from test_serve_http import BASE, Server, _engine, _make_adapter

CANARY_PROMPT = "Once upon a time"
CANARY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def fuzzed(tiny_model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-fuzz") / "adapters"
    _make_adapter(tiny_model_folder, root / "alpha", 4, "all-linear", 1)
    _make_adapter(tiny_model_folder, root / "beta", 8, ["q_proj", "v_proj"], 2)
    engine = _engine(tiny_model_folder, root, max_batch_size=8, max_queue=64).start()
    server = Server(engine)
    client = httpx.Client(base_url=server.url, timeout=60)
    reference = engine.generate(CANARY_PROMPT, "beta", CANARY).token_ids
    yield engine, client, reference
    client.close()
    server.stop()


# Values a hostile client may put in any field: every JSON type, extremes, NaN and infinities
# (Python's json writes them as NaN / Infinity), lone surrogates (written as \ud800 escapes).
hostile_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-45, 5e-324, -0.0, 1e-38, 1e38]),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12),
)
hostile = st.one_of(hostile_scalar, st.lists(hostile_scalar, max_size=4),
                    st.dictionaries(st.text(max_size=5), hostile_scalar, max_size=3))
token_ids = st.lists(st.integers(min_value=-3, max_value=60_000), min_size=0, max_size=8)

common_fields = {
    "model": st.one_of(st.sampled_from([BASE, "alpha", "beta", "gamma", "../alpha", "alpha\n", ""]), hostile),
    "max_tokens": st.one_of(st.integers(min_value=-2, max_value=8), hostile),
    "temperature": st.one_of(st.floats(min_value=0, max_value=3), hostile),
    "top_p": st.one_of(st.floats(min_value=0, max_value=1), hostile),
    "seed": st.one_of(st.integers(min_value=-2**70, max_value=2**70), hostile),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), hostile),
    "stream": st.one_of(st.booleans(), hostile),
    "n": hostile, "logprobs": hostile, "ignore_eos": st.one_of(st.booleans(), hostile),
    "stream_options": st.one_of(st.just({"include_usage": True}), hostile),
}
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40),
                         token_ids, st.lists(st.text(max_size=10), max_size=3), hostile)},
    optional={**common_fields, "echo": hostile})
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                           "content": st.one_of(st.text(max_size=30), hostile)}), hostile)
chat_body = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=3), hostile)},
                                  optional={**common_fields, "max_completion_tokens": hostile})
request = st.one_of(st.tuples(st.just("/v1/completions"), completion_body),
                    st.tuples(st.just("/v1/chat/completions"), chat_body))


def assert_well_formed(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["code"] == response.status_code
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "choices" in chunk or "error" in chunk, chunk
        return
    assert isinstance(response.json()["choices"], list)


def wait_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        metrics = engine.metrics()
        if metrics["running"] == 0 and metrics["queue_length"] == 0:
            return
        assert time.monotonic() < deadline, f"the engine did not go idle: {metrics}"
        time.sleep(0.01)


def cells_held_by_requests(engine) -> int:
    return sum(n for owner, n in engine.pool.owners().items() if not owner.startswith("adapter:"))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                   HealthCheck.too_slow])
@given(request)
def test_any_request_body_gets_a_well_formed_answer_and_leaves_a_concurrent_request_unharmed(fuzzed, request):
    engine, client, reference = fuzzed
    path, body = request
    canary = engine.submit(CANARY_PROMPT, "beta", CANARY)  # running while the fuzzed request arrives
    try:
        data = json.dumps(body, allow_nan=True).encode()  # lone surrogates become \ud800 escapes
    except (ValueError, TypeError):
        data = repr(body).encode("utf-8", "surrogatepass")  # not JSON at all: also a client's right
    response = client.post(path, content=data, headers={"content-type": "application/json"})
    assert_well_formed(response)
    assert canary.result(60).token_ids == reference
    wait_idle(engine)
    assert cells_held_by_requests(engine) == 0
    assert engine.alive


def test_the_soak_benchmark_short_form_holds_every_invariant(tmp_path):
    """bench/soak.py --quick: `lorakit serve` in its own process, good and hostile requests from many
    clients, disconnects and adapter churn; every invariant of the soak must hold."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("bench_soak", bench)
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak
    try:
        spec.loader.exec_module(soak)
        report = soak.main(["--quick", "--seconds", "15", "--out", str(tmp_path / "soak.md")])
    finally:
        sys.modules.pop(spec.name, None)
    assert not report.failures(), (tmp_path / "soak.md").read_text()
    assert report.sent > 100 and report.max_in_flight >= 8
    assert len([o for o in report.outcomes if o.expected is not None]) > 20
    kinds = {o.kind for o in report.outcomes}
    assert {"good", "churn-request", "disconnect-mid-stream", "adapter-huge"} <= kinds
