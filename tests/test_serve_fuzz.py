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
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates too

# A request is a valid body (every field in its allowed range, its edges drawn often) of which one
# field is then replaced by a hostile or near-miss value: a bad value reaches the engine beside
# otherwise valid ones instead of being refused for another field first.
SEED_EDGES = [0, -1, 2**63 - 1, 2**63, 2**64 - 1, -2**63]
valid = {
    "model": st.sampled_from([BASE, "alpha", "beta"]),
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.one_of(st.floats(min_value=0, max_value=3), st.sampled_from([0.0, 1e-45, 5e-324, 1e-6, 100.0])),
    "top_p": st.one_of(st.floats(min_value=1e-45, max_value=1), st.sampled_from([1e-45, 5e-324, 1.0])),
    "seed": st.one_of(st.none(), st.sampled_from(SEED_EDGES), st.integers(min_value=-2**63, max_value=2**64 - 1)),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "stream_options": st.just({"include_usage": True}),
}
# Just past each field's edges, and the wrong JSON types a client sends by mistake.
near_misses = {
    "seed": [2**64, -2**63 - 1, 2**70, -2**70, 1.5, True, "7"],
    "temperature": [-1e-45, 100.0001, float("nan"), float("inf"), True, "0"],
    "top_p": [0.0, -0.0, 1.0000001, float("nan"), float("-inf"), True],
    "max_tokens": [0, -1, 10**12, 2**63, 1.0, True, "4"],
    "model": ["gamma", "../alpha", "alpha\n", "tiny-base\x00", "", None, 5],
    "stop": [[""], ["x" * 2000], ["a"] * 20, [None], 5, ["\ud800"]],
    "stream": ["yes", 1, None],
    "n": [2, 0, -1], "logprobs": [True, 5], "echo": [True], "max_completion_tokens": [0, -5, 10**9],
    "prompt": ["", [], [-1], [10**9], [[]], "\ud800", ["\udfff"]],
    "messages": [[], [{"role": "user"}], [{"role": 1, "content": "x"}], [{"role": "user", "content": "\ud800"}], "hi"],
}


def bad_value(name: str):
    return st.one_of(st.sampled_from(near_misses[name]), hostile) if name in near_misses else hostile


prompts = st.one_of(any_text, token_ids, st.lists(st.text(max_size=10), min_size=1, max_size=3))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                           "content": any_text}), min_size=1, max_size=3)
extras = ("n", "logprobs", "echo", "max_completion_tokens")


@st.composite
def request(draw):
    route = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    fields = draw(st.sets(st.sampled_from(sorted(valid)), max_size=len(valid)))
    body = {name: draw(valid[name]) for name in sorted(fields)}
    body["prompt" if route == "/v1/completions" else "messages"] = draw(prompts if route == "/v1/completions" else messages)
    name = draw(st.sampled_from(sorted(set(valid) | set(extras) | {"prompt", "messages"})))
    body[name] = draw(bad_value(name))
    return route, body


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


def check_one(fuzzed, path: str, body) -> None:
    """The invariant: a well-formed answer, the concurrent canary's exact tokens, no cell left held."""
    engine, client, reference = fuzzed
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


@pytest.mark.parametrize("field,value", [(f, v) for f, values in near_misses.items() for v in values],
                         ids=lambda x: repr(x)[:40])
def test_each_field_just_past_its_edge_gets_a_well_formed_answer_beside_valid_ones(fuzzed, field, value):
    path = "/v1/chat/completions" if field in ("messages", "max_completion_tokens") else "/v1/completions"
    body = {"model": "alpha", "max_tokens": 3, "temperature": 0.7, "seed": 5}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if path.endswith("chat/completions") else {"prompt": "Hi"})
    body[field] = value
    check_one(fuzzed, path, body)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                   HealthCheck.too_slow])
@given(request())
def test_any_request_body_gets_a_well_formed_answer_and_leaves_a_concurrent_request_unharmed(fuzzed, request):
    check_one(fuzzed, *request)


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
