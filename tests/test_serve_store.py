"""The adapter store under hostile files, names and load patterns (issue 13, part 2): a reload serves
the new weights, loading by path needs a root or an explicit opt-in, every file read is checked
(symlinks, FIFOs) without holding the lock, names match whole, /v1/models lists what can be
served, and one host budget bounds every adapter byte (checked against the process's RSS)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.cli.main import build_parser
from lorakit.serve.engine import Engine, SamplingParams
from lorakit.serve.errors import AdapterPathError, AdapterTooLarge, CorruptAdapter, InvalidRequest, UnknownAdapter
from lorakit.serve.lora_batch import LoraWeights
from lorakit.serve.server import create_app
from lorakit.serve.store import AdapterStore
from tests.test_serve_core import tiny_folder, write_lora_folder

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 99, 3, 64]


def model_adapter(folder, model, rank, seed, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")):
    """A PEFT LoRA folder for `model` with random A and B large enough to change greedy outputs."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            modules[path] = (torch.randn(rank, module.in_features, generator=gen),
                             torch.randn(module.out_features, rank, generator=gen) * 0.5)
    return write_lora_folder(folder, modules, rank, rank)


def reference(model_folder, adapter_folder, prompt, max_tokens):
    """Greedy tokens of the base with this one adapter loaded by lorakit, a full forward per token."""
    model = LlamaForCausalLM.from_pretrained(model_folder).eval()
    lorakit.load_adapter(model, adapter_folder)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def make_engine(model_folder, root, **options):
    model = LlamaForCausalLM.from_pretrained(model_folder).eval()
    store_options = {k: options.pop(k) for k in ("host_budget_bytes", "allow_any_path") if k in options}
    store = AdapterStore(root, base_model=model, **store_options)
    return Engine(model, AutoTokenizer.from_pretrained(model_folder), store, **options)


def assert_no_server_path(message: str, *paths) -> None:
    for path in paths:
        assert str(path) not in message, message


def run_with_timeout(fn, timeout=10.0):
    """fn()'s result or exception, failing the test (not hanging it) when fn blocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"blocked for more than {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- 1. unload drops every copy -------------------------------------------------------------------

@pytest.fixture(scope="module")
def versions(tiny_model_folder, tmp_path_factory):
    """Two versions of one adapter under a root, with their single-adapter reference outputs."""
    root = tmp_path_factory.mktemp("versions")
    model = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    folders = {v: model_adapter(root / "v" / v, model, 4, seed) for v, seed in (("v1", 1), ("v2", 2))}
    short = {v: reference(tiny_model_folder, f, PROMPT, GREEDY.max_tokens) for v, f in folders.items()}
    assert short["v1"] != short["v2"]  # else the test could not tell the versions apart
    return root, short


def test_unload_then_load_under_the_same_name_serves_the_new_weights(tiny_model_folder, versions):
    root, expected = versions
    with make_engine(tiny_model_folder, root, device_budget_bytes=2**22) as engine:
        client = TestClient(create_app(engine))
        free_at_start = engine.pool.free_count
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "v/v1"}).status_code == 200
        assert engine.generate(PROMPT, "x", GREEDY).token_ids == expected["v1"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "v/v2"}).status_code == 200
        assert engine.generate(PROMPT, "x", GREEDY).token_ids == expected["v2"]
        assert set(engine.pool.owners()) == {"adapter:x"} and list(engine.multi.active) == ["x"]
        engine.store.unregister("x")
        engine.forget_adapter("x")
        deadline = time.monotonic() + 5
        while engine.pool.free_count != free_at_start:  # the loop drops the resident copy when idle too
            assert time.monotonic() < deadline, engine.pool.owners()
            time.sleep(0.01)
        assert not engine.multi.active and engine.store.stats["host_bytes"] == 0


def test_a_request_running_during_a_reload_finishes_with_the_weights_it_started_with(tiny_model_folder, versions):
    """Semantics: a running request keeps its adapter's weights to the end; a request for the name
    submitted after the reload waits for it, then gets the new weights; no pool cell leaks."""
    root, expected = versions
    long_params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    long_expected = reference(tiny_model_folder, root / "v" / "v1", PROMPT, long_params.max_tokens)
    with make_engine(tiny_model_folder, root, device_budget_bytes=2**22) as engine:
        free_at_start = engine.pool.free_count
        engine.store.register("x", "v/v1")
        running = engine.submit(PROMPT, "x", long_params)
        deadline = time.monotonic() + 10
        while running.first_token_at is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine.store.unregister("x")
        engine.forget_adapter("x")
        engine.store.register("x", "v/v2")
        later = engine.submit(PROMPT, "x", GREEDY)
        assert not running.done  # the reload happened while it ran
        assert later.result(60).token_ids == expected["v2"]
        assert running.result(60).token_ids == long_expected
        assert later.finished_at >= running.finished_at  # it waited for the old weights to be released
        assert set(engine.pool.owners()) <= {"adapter:x"}
        cells = engine.pool.cells_for_bytes(engine.store.get("x").nbytes) if engine.pool.owners() else 0
        assert engine.pool.free_count == free_at_start - cells


# --- 2. loading by path needs a root or an explicit opt-in; errors name no server path ---------------

def test_without_a_root_loading_by_path_is_refused_unless_the_operator_allows_it(tiny_model_folder, tmp_path):
    folder = tiny_folder(tmp_path / "somewhere" / "a")
    store = AdapterStore(None)
    for path in (folder, tmp_path / "missing", "/etc/passwd", "relative/path"):
        with pytest.raises(AdapterPathError) as refused:
            store.register("a", path)
        assert refused.value.status == 403 and "--allow-any-adapter-path" in str(refused.value)
        assert_no_server_path(str(refused.value), tmp_path, "/etc")
    assert store.names() == [] and store.stats["loads"] == 0
    trusting = AdapterStore(None, allow_any_path=True)
    trusting.register("a", folder)
    assert trusting.names() == ["a"]
    assert build_parser().parse_args(["serve", "--allow-any-adapter-path"]).allow_any_adapter_path is True
    assert build_parser().parse_args(["serve"]).allow_any_adapter_path is False

    with make_engine(tiny_model_folder, None) as engine:
        response = TestClient(create_app(engine)).post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(folder)})
        assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
        assert_no_server_path(response.text, tmp_path)


def test_refusals_do_not_say_what_exists_outside_the_root_nor_name_server_paths(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    tiny_folder(tmp_path / "outside" / "real")
    store = AdapterStore(root)
    messages = set()
    for path in (tmp_path / "outside" / "real", tmp_path / "outside" / "missing", "../outside/real", "../outside/missing"):
        with pytest.raises(AdapterPathError) as refused:
            store.register("a", path)
        messages.add(str(refused.value))
    assert len(messages) == 1  # an existing adapter and a missing path outside get the same answer
    assert_no_server_path(messages.pop(), tmp_path)
    for path in ("bad\0path",):
        with pytest.raises(InvalidRequest):
            store.register("a", path)

    broken = {"bad-json": lambda f: (f / "adapter_config.json").write_text("{"),
              "no-weights": lambda f: (f / "adapter_model.safetensors").unlink(),
              "garbage-weights": lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"nonsense"),
              "pickle-only": lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"),
              "weights-folder": lambda f: ((f / "adapter_model.safetensors").unlink(), (f / "adapter_model.safetensors").mkdir())}
    for name, damage in broken.items():
        damage(tiny_folder(root / name))
        for attempt in (lambda: store.get(name), lambda: store.register(name + "-2", name)):
            with pytest.raises(CorruptAdapter) as error:
                attempt()
            assert name in str(error.value)
            assert_no_server_path(str(error.value), tmp_path)


# --- 3. every file read is checked; special files never block; no I/O under the lock ---------------

def test_a_symlinked_file_or_default_folder_leading_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tiny_folder(tmp_path / "outside")
    tiny_folder(root / "shared-source", seed=3)
    for name, link in (("config-link", "adapter_config.json"), ("weights-link", "adapter_model.safetensors")):
        folder = tiny_folder(root / name)
        (folder / link).unlink()
        os.symlink(outside / link, folder / link)
    (root / "default-link").mkdir()
    os.symlink(outside, root / "default-link" / "default")  # PEFT's sub-folder fallback
    (root / "default-file-link" / "default").mkdir(parents=True)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / file, root / "default-file-link" / "default" / file)
    inside = tiny_folder(root / "inside-link")  # a link that stays inside the root is fine
    (inside / "adapter_model.safetensors").unlink()
    os.symlink(root / "shared-source" / "adapter_model.safetensors", inside / "adapter_model.safetensors")

    store = AdapterStore(root)
    for name in ("config-link", "weights-link", "default-link", "default-file-link"):
        with pytest.raises(AdapterPathError) as refused:
            store.get(name)
        assert_no_server_path(str(refused.value), tmp_path)
    assert store.stats["loads"] == 0
    assert store.get("inside-link").modules
    assert store.names() == ["inside-link", "shared-source"]


@pytest.mark.parametrize("fifo_name", ["adapter_config.json", "adapter_model.safetensors", "default/adapter_config.json"])
def test_a_fifo_in_an_adapter_folder_is_refused_without_blocking(tmp_path, fifo_name):
    root = tmp_path / "root"
    folder = root / "piped"
    if fifo_name.startswith("default/"):
        (folder / "default").mkdir(parents=True)
    else:
        tiny_folder(folder)
        (folder / fifo_name).unlink()
    os.mkfifo(folder / fifo_name)
    store = AdapterStore(root)
    # A reader blocked in open() may hold the GIL (safetensors does), freezing this process: a shell
    # outside it opens the FIFO for writing every few seconds, so a broken store fails slowly, not forever.
    unblocker = subprocess.Popen(["sh", "-c", 'while :; do sleep 4; : > "$0"; done', str(folder / fifo_name)])
    try:
        for attempt in (lambda: store.get("piped"), lambda: store.register("other", "piped")):
            started = time.monotonic()
            with pytest.raises(CorruptAdapter, match="FIFO"):
                run_with_timeout(attempt, 30)
            assert time.monotonic() - started < 2, "reading the FIFO blocked"
        started = time.monotonic()
        assert run_with_timeout(store.names, 30) == []
        assert time.monotonic() - started < 2, "listing opened the FIFO"
    finally:
        unblocker.kill()
        unblocker.wait()


def test_a_slow_load_never_blocks_lookups_of_other_adapters_and_is_read_once(tmp_path, monkeypatch):
    root = tmp_path / "root"
    for name in ("cached", "slow", "other"):
        tiny_folder(root / name, seed=len(name))
    store = AdapterStore(root)
    cached = store.get("cached")
    release, reads, original = threading.Event(), [], LoraWeights.from_folder

    def slow_from_folder(name, path, *args, **kwargs):
        reads.append(name)
        if name == "slow":
            assert release.wait(20), "the test never released the slow read"
        return original(name, path, *args, **kwargs)

    monkeypatch.setattr(LoraWeights, "from_folder", staticmethod(slow_from_folder))
    results = []
    slow_readers = [threading.Thread(target=lambda: results.append(store.get("slow"))) for _ in range(3)]
    for reader in slow_readers:
        reader.start()
    deadline = time.monotonic() + 10
    while "slow" not in reads:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    try:
        assert run_with_timeout(lambda: store.get("cached"), 2.0) is cached
        assert run_with_timeout(lambda: store.get("other"), 2.0).name == "other"
        run_with_timeout(store.names, 2.0)
        assert run_with_timeout(lambda: store.stats, 2.0)["cached"] == 2
    finally:
        release.set()
        for reader in slow_readers:
            reader.join(10)
    assert len(results) == 3 and all(w is results[0] for w in results)
    assert reads.count("slow") == 1  # three lookups at once, one read


# --- 4. names ------------------------------------------------------------------------------------

def test_names_match_whole_so_a_trailing_newline_is_not_a_second_name(tmp_path):
    root = tmp_path / "root"
    tiny_folder(root / "x")
    tiny_folder(root / "y\n")  # a folder whose name ends in a newline is not servable either
    store = AdapterStore(root)
    for bad in ("x\n", "x\r\n", "x\n\n", "\nx"):
        with pytest.raises(InvalidRequest):
            store.register(bad, "x")
        with pytest.raises(UnknownAdapter):
            store.get(bad)
        assert bad not in store
    assert store.names() == ["x"] and store.stats["registered"] == 0


# --- 5. /v1/models --------------------------------------------------------------------------------

def test_models_lists_only_servable_adapters_without_reading_tensors(tiny_model_folder, tmp_path):
    root = tmp_path / "root"
    model = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    model_adapter(root / "good", model, 2, 1)
    (model_adapter(root / "bad-json", model, 2, 2) / "adapter_config.json").write_text("{")
    (model_adapter(root / "garbage", model, 2, 3) / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    nan = model_adapter(root / "nan", model, 2, 4) / "adapter_model.safetensors"
    tensors = load_file(str(nan))
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, str(nan))
    tiny_folder(root / "wrong-base")  # sound files, shapes of another model
    os.symlink(model_adapter(tmp_path / "outside", model, 2, 5), root / "link-out")
    with make_engine(tiny_model_folder, root) as engine:
        client = TestClient(create_app(engine))

        def listed():
            response = client.get("/v1/models")
            assert_no_server_path(response.text, tmp_path)
            return {card["id"] for card in response.json()["data"]} - {engine.model_name}

        assert listed() == {"good", "nan", "wrong-base"}  # what config and header show
        assert engine.store.stats["loads"] == 0  # listing reads no tensors
        for name in ("nan", "wrong-base"):
            assert client.post("/v1/completions", json={"model": name, "prompt": "hi"}).status_code == 422
        assert listed() == {"good"}  # a full load that failed marks it, until its files change
        model_adapter(root / "nan", model, 2, 6)
        assert listed() == {"good", "nan"}


# --- 6. one host budget for every adapter byte ------------------------------------------------------

def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: RSS then includes freed heap memory (use a larger slack)
        return None


MALLOC_TRIM = _malloc_trim()


def rss_bytes() -> int:
    """Resident memory, after returning freed heap memory to the system (glibc keeps it otherwise,
    so RSS would measure the allocator's history rather than what is held)."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures RSS through /proc")
def test_the_host_budget_bounds_cached_and_resident_adapters_measured_by_rss(tiny_model_folder, tmp_path):
    """200 adapters of 192 KiB (38 MiB in all) under a 5 MiB budget, a request for each, with a device
    pool large enough to keep them all resident: the store's figure stays within the budget, counts
    the resident factors, and the process's RSS grows by less than the budget plus allocator slack."""
    budget = 5 * 2**20
    # Slack for what is live only for a moment (a batch's activations, pool scans, reads in flight) and,
    # without malloc_trim, freed heap memory; keeping the 200 adapters resident would hold 38 MiB more.
    held_slack, peak_slack = (4, 16) if MALLOC_TRIM is not None else (30, 30)
    root = tmp_path / "root"
    model = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    names = [f"a{i}" for i in range(200)]
    for i, name in enumerate(names):
        model_adapter(root / name, model, 48, i, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    one = LoraWeights.from_folder("a0", root / "a0").nbytes
    assert 180 * 2**10 < one < 200 * 2**10 and one * len(names) > 6 * budget
    with make_engine(tiny_model_folder, root, host_budget_bytes=budget, device_budget_bytes=64 * 2**20,
                     max_queue=512) as engine:
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        for handle in [engine.submit(PROMPT, name, params) for name in names[:20] for _ in range(2)]:
            handle.result(120)  # warm up the allocator and the engine with a burst on a few adapters
        start = rss_bytes()
        peak, reported = [start], [engine.store.stats["host_bytes"]]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(rss_bytes())
                reported.append(engine.metrics()["host_bytes"])
                stop.wait(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            handles = [engine.submit(PROMPT, name, params) for name in names for _ in range(2)]
            for handle in handles:
                handle.result(120)
        finally:
            stop.set()
            sampler.join()
        stats = engine.store.stats
        resident = engine.multi.device_bytes  # on this CPU engine: host memory
        assert len(engine.multi.active) >= 5  # adapters stayed resident, so they had to be counted
        assert max(reported) <= budget and stats["host_bytes"] <= budget
        assert stats["host_bytes"] >= resident  # the resident factors are in the figure
        held = rss_bytes() - start
        assert held < budget + held_slack * 2**20, f"RSS grew by {held / 2**20:.1f} MiB"
        assert max(peak) - start < budget + peak_slack * 2**20, f"RSS peaked {(max(peak) - start) / 2**20:.1f} MiB up"


# --- 7. beyond the issue ----------------------------------------------------------------------------

def test_a_tensor_file_that_cannot_fit_the_budget_is_refused_unread(tmp_path):
    root = tmp_path / "root"
    folder = tiny_folder(root / "huge")
    with open(folder / "adapter_model.safetensors", "r+b") as handle:
        handle.truncate(64 * 2**20)  # sparse: 64 MiB that take no disk
    store = AdapterStore(root, host_budget_bytes=2**20)
    started = time.monotonic()
    with pytest.raises(AdapterTooLarge, match="huge"):
        store.get("huge")
    assert time.monotonic() - started < 1 and store.stats["loads"] == 0 and store.stats["host_bytes"] == 0


def test_an_adapter_with_non_finite_weights_is_refused_at_load_naming_the_tensor(tiny_model_folder, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    weights = model_adapter(tmp_path / "root" / "nan", model, 2, 4) / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    poisoned = sorted(tensors)[0]
    tensors[poisoned][0, 0] = float("inf")
    save_file(tensors, str(weights))
    store = AdapterStore(tmp_path / "root", base_model=model)
    with pytest.raises(CorruptAdapter, match="non-finite") as refused:
        store.get("nan")
    assert poisoned in str(refused.value) and str(tmp_path) not in str(refused.value)
