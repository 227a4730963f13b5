"""Engine isolation: no request can fail or wedge another. Sampling fields are held to the ranges
the sampler takes; a row with non-finite logits fails alone while its batch-mates get exactly their
single-request tokens; every fault gives back every pool cell it took; /health sees a wedged or
stalled loop; the loop sleeps when nothing can be admitted."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.errors import CorruptAdapter, InvalidRequest, NonFiniteLogits, PromptTooLong, UnknownAdapter
from lorakit.serve.server import create_app
from lorakit.serve.store import AdapterStore

PROMPT = "Sort these numbers: 47 12 89"
OTHER = "The quick brown fox"
GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)


def _save(model: LlamaForCausalLM, out, seed: int, b_value: float | None = None, a_value: float | None = None):
    """A LoRA (PEFT format) on q/v/down: random factors, or every entry set to a_value / b_value."""
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.full_like(param, a_value) if a_value is not None else torch.randn(param.shape, generator=generator) * 0.3)
            elif "lora_B" in name:
                param.copy_(torch.full_like(param, b_value) if b_value is not None else torch.randn(param.shape, generator=generator) * 0.5)
    lorakit.save_adapter(model, out)


@pytest.fixture(scope="module")
def served(tiny_model_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation-adapters")
    _save(LlamaForCausalLM.from_pretrained(tiny_model_folder), root / "good", seed=1)
    # finite weights, so every file check passes, but large enough that the activations overflow fp32
    _save(LlamaForCausalLM.from_pretrained(tiny_model_folder), root / "huge", seed=2, a_value=1e10, b_value=1e30)
    other = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    _save(LlamaForCausalLM(other), root / "foreign", seed=3)  # trained on another base: refused when activated
    return tiny_model_folder, root, AutoTokenizer.from_pretrained(tiny_model_folder)


def make_engine(served, **options) -> Engine:
    folder, root, tokenizer = served
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    options.setdefault("device_budget_bytes", 2**22)
    return Engine(model, tokenizer, AdapterStore(root), **options)


def alone(served, prompt: str, adapter: str | None, params: SamplingParams = GREEDY) -> list[int]:
    """The request's tokens from a fresh engine that serves nothing else."""
    with make_engine(served) as engine:
        return engine.generate(prompt, adapter, params, timeout=60).token_ids


def assert_cells_accounted(engine: Engine) -> None:
    """No request holds a cell, and what adapters hold is exactly the resident adapters' cells."""
    owners = engine.pool.owners()
    assert not [o for o in owners if not o.startswith("adapter:")], owners
    assert {o.removeprefix("adapter:") for o in owners} == set(engine._resident)
    assert engine.pool.free_count == engine.pool.cells - sum(owners.values())


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- 1. sampling fields ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields,word", [
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=True), "seed"), (dict(seed=1.5), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(temperature="0.5"), "temperature"), (dict(temperature=-1e-9), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.0000001), "top_p"),
    (dict(max_tokens=True), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(stop=["x"] * 17), "stop"), (dict(stop=["x" * 1025]), "stop"), (dict(stop=["\ud800"]), "surrogate"),
    (dict(stop=5), "stop"), (dict(ignore_eos="yes"), "ignore_eos"),
], ids=lambda v: repr(v)[:40])
def test_sampling_fields_outside_the_safe_range_are_refused_by_name(fields, word):
    with pytest.raises(InvalidRequest, match=word):
        SamplingParams(**fields)


def test_edge_sampling_values_run_without_failing_anyone_and_mean_what_the_docstring_says(served):
    greedy = alone(served, PROMPT, "good")
    sampled = dict(max_tokens=5, ignore_eos=True, temperature=1.0)
    with make_engine(served) as engine:
        before = engine.pool.free_count
        handles = {
            "tiny-temperature": engine.submit(PROMPT, "good", SamplingParams(max_tokens=5, ignore_eos=True, temperature=1e-45, seed=3)),
            "tiny-top-p": engine.submit(PROMPT, "good", SamplingParams(top_p=1e-45, seed=3, **sampled)),
            "seed-minus-one": engine.submit(PROMPT, "good", SamplingParams(seed=-1, **sampled)),
            "seed-top": engine.submit(PROMPT, "good", SamplingParams(seed=2**64 - 1, **sampled)),
            "seed-bottom": engine.submit(PROMPT, "good", SamplingParams(seed=-2**63, **sampled)),
            "seed-bottom-mapped": engine.submit(PROMPT, "good", SamplingParams(seed=2**63, **sampled)),
        }
        results = {name: h.result(timeout=60).token_ids for name, h in handles.items()}
        wait_until(lambda: not engine.pool.owners().keys() - {"adapter:good"})
        assert engine.pool.free_count == before - engine.pool.owners().get("adapter:good", 0)
        assert_cells_accounted(engine)
    assert results["tiny-temperature"] == greedy  # below 1e-5: greedy
    assert results["tiny-top-p"] == greedy  # the most likely token always survives top-p
    assert results["seed-minus-one"] == results["seed-top"]  # a negative seed s is s + 2**64
    assert results["seed-bottom"] == results["seed-bottom-mapped"]


# --- 2. non-finite logits fail only their own row ---------------------------------------------------

def test_non_finite_logits_fail_only_their_request_and_batch_mates_get_their_alone_tokens(served):
    expected = {(PROMPT, "good"): alone(served, PROMPT, "good"), (OTHER, None): alone(served, OTHER, None)}
    long = SamplingParams(max_tokens=12, ignore_eos=True)
    expected_long = alone(served, OTHER, "good", long)
    engine = make_engine(served, max_batch_size=8)
    # queued before the loop starts: all three are prefilled and decoded in the same batch
    good, bad, base = engine.submit(PROMPT, "good", GREEDY), engine.submit(PROMPT, "huge", GREEDY), engine.submit(OTHER, None, GREEDY)
    with engine:
        assert good.result(timeout=60).token_ids == expected[(PROMPT, "good")]
        assert base.result(timeout=60).token_ids == expected[(OTHER, None)]
        with pytest.raises(NonFiniteLogits, match="'huge'.*non-finite") as failure:
            bad.result(timeout=60)
        assert failure.value.status == 422
        # a bad row joining a running batch mid-flight: the running request is untouched
        running = engine.submit(OTHER, "good", long)
        wait_until(lambda: len(engine._running) == 1 and running.first_token_at is not None)
        late = engine.submit(PROMPT, "huge", GREEDY)
        with pytest.raises(NonFiniteLogits):
            late.result(timeout=60)
        assert running.result(timeout=60).token_ids == expected_long
        wait_until(lambda: engine.metrics()["running"] == 0)
        assert_cells_accounted(engine)
        assert engine.metrics()["requests_failed"] == 2 and engine.alive


# --- 3. every fault frees its cells -----------------------------------------------------------------

def _fail_two_row_decode(engine: Engine):
    """The first decode step of two rows raises: a batched forward failing for everyone in it."""
    def hook(module, args):
        if args[0].shape == (2, 1):
            raise RuntimeError("injected forward failure")

    return engine.model.get_input_embeddings().register_forward_pre_hook(hook)


def _fail_forward(engine: Engine, on_call: int):
    """The model's on_call-th forward from now raises (a kernel failure, an OOM)."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise RuntimeError("injected forward failure")

    return engine.model.get_input_embeddings().register_forward_pre_hook(hook)


def test_every_fault_class_returns_the_pool_to_its_starting_free_cells(served):
    canary_tokens = alone(served, OTHER, "good")
    _, root, _ = served
    engine = make_engine(served, max_batch_size=4).start()
    try:
        assert engine.generate(OTHER, "good", GREEDY, timeout=60).token_ids == canary_tokens  # "good" now resident
        start = engine.pool.free_count

        def settled_and_serving(label: str) -> None:
            wait_until(lambda: engine.metrics()["running"] == 0 and engine.metrics()["queue_length"] == 0)
            assert_cells_accounted(engine)
            resident_extra = sum(n for o, n in engine.pool.owners().items() if o != "adapter:good")
            assert engine.pool.free_count + resident_extra == start, label
            assert engine.generate(OTHER, "good", GREEDY, timeout=60).token_ids == canary_tokens, label
            assert engine.alive and engine.health()["status"] == "ok", label

        with pytest.raises(InvalidRequest, match="seed"):  # refused at submit, before any cell is taken
            engine.submit(PROMPT, "good", SamplingParams(seed=2**70))
        settled_and_serving("bad seed")

        with pytest.raises(NonFiniteLogits):
            engine.generate(PROMPT, "huge", GREEDY, timeout=60)
        settled_and_serving("non-finite logits")

        hook = _fail_forward(engine, on_call=1)  # the prefill
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(PROMPT, "good", GREEDY, timeout=60)
        hook.remove()
        settled_and_serving("prefill failure")

        hook = _fail_two_row_decode(engine)
        pair_params = SamplingParams(max_tokens=20, ignore_eos=True)
        pair = [engine.submit(PROMPT, "good", pair_params), engine.submit(OTHER, None, pair_params)]
        for handle in pair:
            with pytest.raises(RuntimeError, match="injected"):
                handle.result(timeout=60)
        hook.remove()
        settled_and_serving("decode failure")

        with pytest.raises(CorruptAdapter, match="foreign"):  # passes the store, refused when activated
            engine.generate(PROMPT, "foreign", GREEDY, timeout=60)
        settled_and_serving("adapter that does not fit the model")

        engine.store.register("doomed", root / "good")
        gate, entered = threading.Event(), threading.Event()

        def hold(*_):
            entered.set()
            gate.wait(30)

        hook = engine.model.get_input_embeddings().register_forward_pre_hook(hold)
        blocker = engine.submit(OTHER, None, GREEDY)  # holds the loop while "doomed" waits in the queue
        assert entered.wait(20)
        doomed = engine.submit(PROMPT, "doomed", GREEDY)
        engine.store.unregister("doomed")  # broken after submit: gone when the loop reads it
        gate.set()
        hook.remove()
        blocker.result(timeout=60)
        with pytest.raises(UnknownAdapter, match="doomed"):
            doomed.result(timeout=60)
        settled_and_serving("adapter unregistered after submit")

        waiting_long = SamplingParams(max_tokens=40, ignore_eos=True)
        running = engine.submit(PROMPT, "good", waiting_long)
        wait_until(lambda: running.first_token_at is not None)
        queued = [engine.submit(OTHER, "good", waiting_long) for _ in range(6)]  # beyond the batch: some wait
        for handle in [running, *queued]:
            handle.cancel()
        assert {h.result(timeout=60).finish_reason for h in [running, *queued]} == {"cancelled"}
        settled_and_serving("cancellation")
    finally:
        engine.shutdown(graceful=False)


def test_a_request_whose_adapter_can_never_fit_the_pool_fails_instead_of_waiting_forever(served):
    probe = make_engine(served)
    adapter_cells = probe.pool.cells_for_bytes(probe.store.get("good").nbytes)
    prompt_tokens = len(probe._encode(PROMPT))
    budget = (adapter_cells + prompt_tokens + 4) * probe.pool.cell_bytes  # the request's KV cells fit; with the adapter, not
    with make_engine(served, device_budget_bytes=budget) as engine:
        with pytest.raises(PromptTooLong, match="'good'"):
            engine.generate(PROMPT, "good", SamplingParams(max_tokens=8, ignore_eos=True), timeout=30)
        assert_cells_accounted(engine)
        assert engine.generate(PROMPT, None, SamplingParams(max_tokens=4), timeout=30).completion_tokens >= 1


# --- 4-6. health, metrics, no busy-waiting ----------------------------------------------------------

def test_health_reports_a_wedged_step_with_its_numbers_then_recovers(served):
    engine = make_engine(served, stall_timeout=0.3).start()
    client = TestClient(create_app(engine))
    gate, entered = threading.Event(), threading.Event()

    def hold(*_):
        entered.set()
        gate.wait(30)

    hook = engine.model.get_input_embeddings().register_forward_pre_hook(hold)
    try:
        assert client.get("/health").status_code == 200
        handle = engine.submit(PROMPT, "good", GREEDY)
        assert entered.wait(20)
        time.sleep(0.5)
        response = client.get("/health")
        assert response.status_code == 503, response.text
        report = response.json()
        assert "wedged" in report["reason"] and report["heartbeat_age_s"] > 0.3
        assert report["running"] == 1 and report["queue_length"] == 0
        metrics = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
        assert metrics["lorakit_engine_heartbeat_age_seconds"] > 0.3
        gate.set()
        handle.result(timeout=60)
        hook.remove()
        wait_until(lambda: client.get("/health").status_code == 200)
        assert client.get("/health").json()["status"] == "ok"
    finally:
        gate.set()
        engine.shutdown(graceful=False)


def test_metrics_export_pool_cells_as_gauges(served):
    with make_engine(served) as engine:
        client = TestClient(create_app(engine))
        engine.generate(PROMPT, "good", GREEDY, timeout=60)
        text = client.get("/metrics").text
        metrics = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert metrics["lorakit_pool_cells"] == engine.pool.cells
        adapter_cells = engine.pool.owners()["adapter:good"]
        assert metrics["lorakit_pool_free_cells"] == engine.pool.free_count == engine.pool.cells - adapter_cells
        assert metrics["lorakit_pool_adapter_cells"] == adapter_cells and metrics["lorakit_pool_request_cells"] == 0
        assert "# TYPE lorakit_pool_free_cells gauge" in text


def test_a_queue_that_cannot_be_admitted_sleeps_instead_of_spinning_and_health_says_stalled(served):
    engine = make_engine(served, stall_timeout=0.3).start()
    client = TestClient(create_app(engine))
    held = engine.pool.alloc(engine.pool.free_count, owner="test-hold")  # every cell: nothing can be admitted
    assert held is not None
    try:
        handle = engine.submit(PROMPT, None, GREEDY)
        time.sleep(0.1)
        iterations, cpu = engine.metrics()["loop_iterations"], time.process_time()
        time.sleep(0.5)
        assert engine.metrics()["loop_iterations"] - iterations <= 5  # a spinning loop makes thousands
        assert time.process_time() - cpu < 0.25
        response = client.get("/health")
        assert response.status_code == 503 and "stalled" in response.json()["reason"]
        assert response.json()["queue_length"] == 1
        engine.pool.free("test-hold")
        engine.wake()
        assert handle.result(timeout=30).token_ids == alone(served, PROMPT, None)
        wait_until(lambda: client.get("/health").status_code == 200)
    finally:
        engine.pool.free("test-hold")
        engine.shutdown(graceful=False)


def test_a_dead_loop_fails_its_requests_and_health_says_so(served):
    """A BaseException the step does not catch ends the thread; nobody may wait on it forever."""
    engine = make_engine(served)
    handle = engine.submit(PROMPT, None, GREEDY)

    def die(*_):
        raise SystemExit("injected loop death")

    hook = engine.model.get_input_embeddings().register_forward_pre_hook(die)
    queued = [engine.submit(OTHER, None, GREEDY) for _ in range(3)]
    engine.start()
    try:
        for h in [handle, *queued]:
            with pytest.raises(Exception, match="loop died|injected"):
                h.result(timeout=30)
        wait_until(lambda: not engine._thread.is_alive())
        report = engine.health()
        assert report["status"] == "unavailable" and "died" in report["reason"]
        assert_cells_accounted(engine)
        with pytest.raises(Exception, match="died"):
            engine.submit(PROMPT, None, GREEDY)
    finally:
        hook.remove()
        engine.shutdown(graceful=False, timeout=1)


def test_prompt_character_limit_is_checked_before_tokenizing(served):
    engine = make_engine(served, max_prompt_chars=100)
    calls = []
    engine.tokenizer = _CountingTokenizer(engine.tokenizer, calls)
    with pytest.raises(PromptTooLong, match="101 characters.*100"):
        engine.submit("a" * 101)
    with pytest.raises(PromptTooLong, match="characters"):
        engine.apply_chat_template([{"role": "user", "content": "a" * 60}, {"role": "user", "content": "b" * 60}])
    assert calls == []
    with pytest.raises(InvalidRequest, match="surrogate"):
        engine.submit("ab\udc80")
    assert engine.submit("a" * 50).id and calls


class _CountingTokenizer:
    """The real tokenizer, recording that it was asked to encode (to see a check happen before it)."""

    def __init__(self, tokenizer, calls: list):
        self._tokenizer, self._calls = tokenizer, calls

    def encode(self, *args, **kwargs):
        self._calls.append("encode")
        return self._tokenizer.encode(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self._calls.append("chat")
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("flag,value", [("--max-body-bytes", "0"), ("--body-timeout", "-1"), ("--stall-timeout", "nan"),
                                        ("--max-prompt-chars", "x"), ("--max-queue", "-5"), ("--host-cache-mb", "inf"),
                                        ("--shutdown-timeout", "0"), ("--max-batch-size", "1.5")])
def test_serve_refuses_a_bad_limit_before_loading_any_model(flag, value, capsys):
    from lorakit.cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
