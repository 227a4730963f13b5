"""lorakit.serve model side: the unified pool, batched heterogeneous LoRA, the adapter store.

Follows the verification recipe of ../shared/methods/s-lora.md (S-LoRA, arXiv 2311.03285): the three
LoRA evaluations agree and padding contributes exactly 0 (1), rows without adapter get the base
output exactly (2), pool invariants under random alloc/free (3), fragmentation contrast (5); and the
issue's test: every row of a mixed batch equals that row run alone with its adapter merged.
"""

from __future__ import annotations

import copy
import json
import os
import random
import threading

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from lorakit.serve.errors import AdapterConflict, AdapterPathError, CorruptAdapter, InvalidRequest, UnknownAdapter
from lorakit.serve.lora_batch import (
    LoraWeights,
    MultiLoraModel,
    lora_loop,
    lora_padded_bmm,
    lora_segment,
    pad_factors,
    rank_bucket,
)
from lorakit.serve.pool import UnifiedPool
from lorakit.serve.store import AdapterStore, AdapterTooLarge
from tests.conftest import tiny_llama

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


# --- helpers ---------------------------------------------------------------------------------------

def random_factors(ranks, d_in, d_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen, dtype=dtype), torch.randn(d_out, r, generator=gen, dtype=dtype),
             0.5 + i / 4) for i, r in enumerate(ranks)]


def random_lora(model, name, rank, targets, seed, scale=0.7):
    """LoraWeights with random A and B (large enough to change the outputs) on the given layer names."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            A = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
            B = torch.randn(module.out_features, rank, generator=gen) / rank ** 0.5
            modules[path] = (A, B, scale)
    return LoraWeights(name, modules)


def merged_copy(model, weights):
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path, (A, B, scale) in weights.modules.items():
            merged.get_submodule(path).weight += scale * (B @ A)
    return merged


def write_lora_folder(folder, modules, r, alpha, **config):
    """A PEFT-format LoRA folder written directly (fast: no model needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (A, B) in modules.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    data = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({p.rsplit(".", 1)[-1] for p in modules}),
            "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", **config}
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder


def tiny_folder(folder, rank=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return write_lora_folder(folder, {"model.layers.0.self_attn.q_proj": (torch.randn(rank, d, generator=gen),
                                                                        torch.randn(d, rank, generator=gen))}, rank, 2 * rank)


# --- recipe 1 and 2: the three evaluations ---------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_loop_padded_bmm_and_segment_agree_on_a_token_matrix(dtype, tol):
    ranks, lengths, H = [1, 4, 8, 8, 16], [3, 1, 7, 2, 5], 64
    adapters = random_factors(ranks, H, H, dtype)
    ids = torch.repeat_interleave(torch.arange(5), torch.tensor(lengths))
    x = torch.randn(len(ids), H, dtype=dtype, generator=torch.Generator().manual_seed(1))
    loop = lora_loop(x, ids, adapters)
    # the reference itself, in float64 by plain matrix products
    expected = torch.stack([adapters[a][2] * (adapters[a][1].double() @ (adapters[a][0].double() @ x[t].double()))
                            for t, a in enumerate(ids.tolist())])
    scale = expected.abs().max().item()
    assert (loop.double() - expected).abs().max().item() <= tol * scale
    padded, shrink = lora_padded_bmm(x, ids, adapters, return_shrink=True)
    assert (padded - loop).abs().max().item() <= tol * scale
    assert (lora_segment(x, ids, adapters) - loop).abs().max().item() <= tol * scale
    # padding contributes exactly zero: the shrink of a rank-r_a row is 0 beyond r_a
    for t, a in enumerate(ids.tolist()):
        assert torch.equal(shrink[t, ranks[a]:], torch.zeros_like(shrink[t, ranks[a]:]))
        assert shrink[t, : ranks[a]].abs().min() > 0


def test_padded_factor_stacks_are_zero_beyond_each_rank():
    adapters = random_factors([1, 3, 4], 6, 5, torch.float32)
    A_stack, B_stack = pad_factors(adapters, 4)
    for i, (A, B, scale) in enumerate(adapters):
        r = A.shape[0]
        assert torch.equal(A_stack[i, :r], A) and torch.equal(B_stack[i, :, :r], B * scale)
        assert not A_stack[i, r:].any() and not B_stack[i, :, r:].any()
    assert [rank_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


def test_rows_without_adapter_get_exactly_zero_lora_term():
    adapters = random_factors([2, 3], 8, 8, torch.float32)
    ids = torch.tensor([-1, 0, -1, 1, -1])
    x = torch.randn(5, 8)
    for fn in (lora_loop, lora_segment, lora_padded_bmm):
        out = fn(x, ids, adapters)
        assert not out[ids < 0].any()
        assert out[ids >= 0].abs().min() > 0


# --- the test: a mixed batch on a real architecture ----------------------------------------

def mixed_adapters(model):
    """Ranks {1,4,8,8,16}; two of them target other modules (MLP only / q,v only) than the rest."""
    return [random_lora(model, "r1", 1, ATTN + MLP, seed=1),
            random_lora(model, "r4", 4, MLP, seed=2),
            random_lora(model, "r8a", 8, ATTN + MLP, seed=3),
            random_lora(model, "r8b", 8, ["q_proj", "v_proj"], seed=4, scale=2.0),
            random_lora(model, "r16", 16, ATTN + MLP, seed=5, scale=0.25)]


@pytest.mark.parametrize("mode", ["segment", "bmm"])
def test_every_row_equals_that_row_alone_with_its_adapter_merged(mode):
    torch.manual_seed(0)
    model = tiny_llama()
    adapters = mixed_adapters(model)
    multi = MultiLoraModel(model, mode=mode)
    for weights in adapters:
        multi.activate(weights)
    rows = ["r8a", None, "r1", "r16", "r4", "r8b", "r8a"]
    input_ids = torch.randint(0, 128, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        with multi.rows(rows):  # prefill, then one decode step with the KV cache
            cache = DynamicCache()
            prefill = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits
            step_ids = prefill[:, -1].argmax(-1, keepdim=True)
            step = model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits
        by_name = {w.name: w for w in adapters}
        for i, name in enumerate(rows):
            reference = model if name is None else merged_copy(model, by_name[name])
            ref_cache = DynamicCache()
            ref_prefill = reference(input_ids=input_ids[i:i + 1], past_key_values=ref_cache, use_cache=True).logits
            ref_step = reference(input_ids=step_ids[i:i + 1], past_key_values=ref_cache, use_cache=True).logits
            assert (prefill[i] - ref_prefill[0]).abs().max().item() <= 1e-4, (mode, name)
            assert (step[i] - ref_step[0]).abs().max().item() <= 1e-4, (mode, name)
            if name is None:
                assert torch.equal(prefill[i], base[i])  # recipe 2: no adapter, exactly the base
            else:
                assert (prefill[i] - base[i]).abs().max().item() > 1e-2  # the adapter does act
    # outside rows() and after close() the model is the plain base model again
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, base)
        multi.close()
        assert not any(m._forward_hooks for m in model.modules())


def test_bfloat16_base_mixed_batch_matches_the_fp32_reference():
    model = tiny_llama()
    adapters = mixed_adapters(model)
    rows = ["r16", None, "r4", "r1"]
    input_ids = torch.randint(0, 128, (len(rows), 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        references = [model(input_ids=input_ids[i:i + 1]).logits[0] if n is None else
                      merged_copy(model, next(w for w in adapters if w.name == n))(input_ids=input_ids[i:i + 1]).logits[0]
                      for i, n in enumerate(rows)]
        half = copy.deepcopy(model).to(torch.bfloat16)
        base = half(input_ids=input_ids).logits
        for mode in ("segment", "bmm"):
            multi = MultiLoraModel(half, mode=mode)
            for weights in adapters:
                multi.activate(weights)
            with multi.rows(rows):
                out = half(input_ids=input_ids).logits
            multi.close()
            assert out.dtype == torch.bfloat16
            assert torch.equal(out[1], base[1])
            for i, ref in enumerate(references):
                assert (out[i].float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item(), (mode, rows[i])


def test_segment_and_bucketed_bmm_agree_and_stacks_follow_activation():
    model = tiny_llama()
    adapters = mixed_adapters(model)
    segment, bmm = MultiLoraModel(model, "segment"), MultiLoraModel(copy.deepcopy(model), "bmm")
    rows = ["r16", "r8a", "r8b", "r1", None, "r4", "r8a", "r16"]
    input_ids = torch.randint(0, 128, (len(rows), 1), generator=torch.Generator().manual_seed(4))
    for multi in (segment, bmm):
        for weights in adapters:
            multi.activate(weights)
    with torch.no_grad(), segment.rows(rows):
        first = segment.model(input_ids=input_ids).logits
    with torch.no_grad(), bmm.rows(rows):
        second = bmm.model(input_ids=input_ids).logits
    assert (first - second).abs().max().item() <= 1e-5
    stacks = bmm._bucket_stacks("model.layers.0.self_attn.q_proj")
    assert {bucket: names for bucket, (names, _, _) in stacks.items()} == {1: ("r1",), 8: ("r8a", "r8b"), 16: ("r16",)}
    bmm.deactivate("r8a")
    assert bmm._bucket_stacks("model.layers.0.self_attn.q_proj")[8][0] == ("r8b",)
    with pytest.raises(UnknownAdapter, match="not active"):
        with bmm.rows(["r8a"]):
            pass


def test_activate_refuses_an_adapter_of_another_model():
    model = tiny_llama()
    wrong = LoraWeights("w", {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 5), torch.zeros(32, 2), 1.0)})
    with pytest.raises(CorruptAdapter, match="another base model"):
        MultiLoraModel(model).activate(wrong)
    missing = LoraWeights("m", {"model.layers.9.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2), 1.0)})
    with pytest.raises(CorruptAdapter, match="not an nn.Linear"):
        MultiLoraModel(model).activate(missing)


# --- LoraWeights.from_folder ------------------------------------------------------------------------

def test_a_folder_saved_by_peft_serves_as_peft_computes_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3.0}, init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    weights = LoraWeights.from_folder("p", tmp_path / "peft")
    assert weights.max_rank == 4
    assert weights.modules["model.layers.1.mlp.down_proj"][0].shape == (2, 48)
    assert weights.modules["model.layers.0.self_attn.v_proj"][2] == pytest.approx(3.0 / 2.0)  # alpha / sqrt(r)
    assert weights.nbytes == sum(A.numel() + B.numel() for A, B, _ in weights.modules.values()) * 4
    input_ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    multi = MultiLoraModel(model)
    multi.activate(weights)
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
        with multi.rows(["p", "p"]):
            out = model(input_ids=input_ids).logits
    assert (out - expected).abs().max().item() <= 1e-5


def test_a_lorakit_lora_folder_with_patterns_serves_as_lorakit_computes_it(tmp_path):
    import lorakit

    model = tiny_llama()
    trained = lorakit.inject(copy.deepcopy(model), lorakit.LoraConfig(
        r=4, alpha=6.0, use_rslora=True, target_modules=["k_proj", "up_proj"], rank_pattern={"up_proj": 3},
        alpha_pattern={r"layers\.1\.self_attn\.k_proj": 2.0}))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    lorakit.save_adapter(trained, tmp_path / "lora")
    weights = LoraWeights.from_folder("l", tmp_path / "lora", base_model=model)
    assert weights.modules["model.layers.1.self_attn.k_proj"][2] == pytest.approx(2.0 / 2.0)
    assert weights.modules["model.layers.0.mlp.up_proj"][0].shape == (3, 32)
    input_ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(7))
    multi = MultiLoraModel(model, mode="bmm")
    multi.activate(weights)
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        with multi.rows(["l", None, "l"]):
            out = model(input_ids=input_ids).logits
        base = model(input_ids=input_ids).logits
    assert (out[[0, 2]] - expected[[0, 2]]).abs().max().item() <= 1e-4
    assert torch.equal(out[1], base[1])


def test_a_lorakit_vera_adapter_is_converted_exactly_given_the_base(tmp_path):
    import lorakit

    model = tiny_llama()
    trained = lorakit.inject(copy.deepcopy(model), lorakit.VeraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    lorakit.save_adapter(trained, tmp_path / "vera")
    with pytest.raises(CorruptAdapter, match=r"lorakit export .* --to lora --rank 4"):
        LoraWeights.from_folder("v", tmp_path / "vera")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = LoraWeights.from_folder("v", tmp_path / "vera", base_model=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # base untouched
    assert weights.max_rank == 4 and weights.conversion_error <= 1e-5
    input_ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(6))
    multi = MultiLoraModel(model)
    multi.activate(weights)
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        with multi.rows(["v"]):
            out = model(input_ids=input_ids).logits
    assert (out - expected).abs().max().item() <= 1e-4


def test_dora_needs_the_base_model_and_reports_its_conversion_error(tmp_path):
    import lorakit

    model = tiny_llama()
    trained = lorakit.inject(copy.deepcopy(model), lorakit.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    lorakit.save_adapter(trained, tmp_path / "dora")
    with pytest.raises(CorruptAdapter, match="DoRA"):
        LoraWeights.from_folder("d", tmp_path / "dora")
    weights = LoraWeights.from_folder("d", tmp_path / "dora", base_model=model)
    assert weights.max_rank == 2 and 0 < weights.conversion_error < 1


@pytest.mark.parametrize("damage", ["garbage weights", "no weights", "pickle only", "bad json", "rank mismatch",
                                    "missing B", "not lora keys", "nan", "no config", "unknown peft_type"])
def test_corrupt_folders_raise_corrupt_adapter(tmp_path, damage):
    folder = tiny_folder(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    config = json.loads((folder / "adapter_config.json").read_text())
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    if damage == "garbage weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    elif damage == "no weights":
        weights.unlink()
    elif damage == "pickle only":
        weights.unlink()
        (folder / "adapter_model.bin").write_bytes(b"pickle")
    elif damage == "bad json":
        (folder / "adapter_config.json").write_text("{")
    elif damage == "rank mismatch":
        (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    elif damage == "missing B":
        save_file({f"{key}.lora_A.weight": torch.zeros(2, 8)}, str(weights))
    elif damage == "not lora keys":
        save_file({f"{key}.lora_A.weight": torch.zeros(2, 8), f"{key}.lora_B.weight": torch.zeros(8, 2),
                   f"{key}.lora_B.bias": torch.zeros(8)}, str(weights))
    elif damage == "nan":
        save_file({f"{key}.lora_A.weight": torch.full((2, 8), float("nan")), f"{key}.lora_B.weight": torch.zeros(8, 2)},
                  str(weights))
    elif damage == "no config":
        (folder / "adapter_config.json").unlink()
    elif damage == "unknown peft_type":
        (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "NOT_A_METHOD"}))
    with pytest.raises(CorruptAdapter):
        LoraWeights.from_folder("a", folder)


# --- AdapterStore -----------------------------------------------------------------------------------

def test_store_names_register_unregister_and_conflicts(tmp_path):
    root = tmp_path / "root"
    tiny_folder(root / "alpha")
    tiny_folder(root / "extra" / "beta", seed=1)
    (root / "not-an-adapter").mkdir()
    store = AdapterStore(root)
    assert store.names() == ["alpha"]
    assert "alpha" in store and "beta" not in store
    store.register("beta", root / "extra" / "beta")
    store.register("beta", "extra/beta")  # the same folder again: no-op
    assert store.names() == ["alpha", "beta"] and store.stats["registered"] == 1
    with pytest.raises(AdapterConflict):
        store.register("beta", root / "alpha")
    with pytest.raises(AdapterConflict):
        store.register("alpha", root / "extra" / "beta")
    with pytest.raises(AdapterConflict, match="sub-folder"):
        store.unregister("alpha")
    store.unregister("beta")
    assert store.names() == ["alpha"]
    with pytest.raises(UnknownAdapter):
        store.unregister("beta")
    with pytest.raises(UnknownAdapter):
        store.get("beta")
    with pytest.raises(InvalidRequest):
        store.register("../x", root / "alpha")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")
    with pytest.raises(CorruptAdapter):
        store.register("broken2", root / "broken")
    assert "broken2" not in store


def test_store_refuses_paths_outside_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tiny_folder(tmp_path / "outside")
    store = AdapterStore(root)
    for path in ["../outside", str(outside), root / ".." / "outside", "/etc"]:
        with pytest.raises(AdapterPathError):
            store.register("x", path)
    os.symlink(outside, root / "link")  # a link inside the root that leads out
    with pytest.raises(AdapterPathError):
        store.register("x", root / "link")
    with pytest.raises(AdapterPathError):
        store.get("link")
    assert store.names() == []
    os.symlink(root / "..", root / "up")
    with pytest.raises(AdapterPathError):
        store.register("x", "up/outside")
    assert store.stats["loads"] == 0


def test_store_lru_counts_hits_misses_and_evicts_over_budget(tmp_path):
    root = tmp_path / "root"
    for name in "abc":
        tiny_folder(root / name, seed=ord(name))
    one = LoraWeights.from_folder("a", root / "a").nbytes
    store = AdapterStore(root, host_budget_bytes=2 * one)
    assert store.get("a") is store.get("a")
    store.get("b")
    store.get("a")       # a is now the most recent
    store.get("c")       # evicts b
    assert store.stats["host_bytes"] == 2 * one and store.stats["cached"] == 2
    store.get("a")
    store.get("b")       # miss: b was evicted; evicts c
    stats = store.stats
    assert (stats["hits"], stats["misses"], stats["loads"], stats["evictions"]) == (3, 4, 4, 2)
    small = AdapterStore(root, host_budget_bytes=one - 1)
    with pytest.raises(AdapterTooLarge, match="host_budget_bytes"):
        small.get("a")
    assert small.stats["host_bytes"] == 0


def test_store_holds_a_thousand_registered_adapters_within_its_budget(tmp_path):
    root = tmp_path / "root"
    folders = [tiny_folder(root / "pool" / f"f{i}", seed=i) for i in range(10)]
    one = LoraWeights.from_folder("x", folders[0]).nbytes
    store = AdapterStore(root, host_budget_bytes=5 * one)
    for i in range(1000):
        store.register(f"adapter-{i}", folders[i % 10])
    assert len(store.names()) == 1000 and store.stats["registered"] == 1000
    for i in random.Random(0).sample(range(1000), 50):
        assert store.get(f"adapter-{i}").name == f"adapter-{i}"
    stats = store.stats
    assert stats["host_bytes"] <= 5 * one and stats["cached"] == 5
    assert stats["evictions"] == stats["loads"] - 5


def test_store_is_consistent_under_concurrent_gets(tmp_path):
    root = tmp_path / "root"
    for i in range(6):
        tiny_folder(root / f"a{i}", seed=i)
    one = LoraWeights.from_folder("x", root / "a0").nbytes
    store = AdapterStore(root, host_budget_bytes=3 * one)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(40):
                name = f"a{rng.randrange(6)}"
                assert store.get(name).name == name
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = store.stats
    assert stats["hits"] + stats["misses"] == 160 and stats["loads"] == stats["misses"]
    assert stats["host_bytes"] == stats["cached"] * one <= 3 * one


# --- UnifiedPool ------------------------------------------------------------------------------------

def check_invariants(pool):
    owners = {owner: pool.cells_of(owner) for owner in pool.owners()}
    held = torch.cat(list(owners.values())) if owners else torch.empty(0, dtype=torch.long)
    assert held.unique().numel() == held.numel()  # no cell in two owners
    assert pool.free_count + held.numel() == pool.cells


def test_pool_invariants_under_random_alloc_and_free():
    pool = UnifiedPool(cells=500, cell_bytes=64)
    rng = random.Random(0)
    live = []
    for step in range(1000):
        if live and rng.random() < 0.4:
            owner = live.pop(rng.randrange(len(live)))
            pool.free(owner)
        else:
            owner = f"adapter-{step}" if rng.random() < 0.3 else f"request-{step}"
            n = 4 * rng.choice([1, 2, 4, 8, 16]) if owner.startswith("adapter") else rng.randint(1, 40)
            free = pool.free_count
            cells = pool.alloc(n, owner)
            if n > free:
                assert cells is None and pool.free_count == free  # fails gracefully, nothing taken
            else:
                assert cells.numel() == n
                live.append(owner)
        check_invariants(pool)
    for owner in live:
        pool.free(owner)
    assert pool.free_count == pool.cells and pool.owners() == {}


def fragmented_pool():
    """Recipe 5: adapters of ranks 1, 2, 4 (4r cells each) and KV for 20 tokens, then the rank-2
    adapter and every other KV token freed."""
    pool = UnifiedPool(cells=56, cell_bytes=1)
    for rank in (1, 2, 4):
        pool.alloc(4 * rank, f"adapter-r{rank}")
    assert pool.cells_of("adapter-r4").tolist() == list(range(12, 28))
    for token in range(20):
        assert pool.alloc(1, f"kv-{token}").tolist() == [28 + token]
    pool.free("adapter-r2")
    for token in range(0, 20, 2):
        pool.free(f"kv-{token}")
    return pool


def test_pool_pages_where_a_contiguous_allocator_fails():
    pool = fragmented_pool()
    assert pool.free_count == 26 and pool.longest_free_run() == 8
    cells = pool.alloc(16, "adapter-r4-second")
    assert cells is not None and cells.numel() == 16
    assert (cells.diff() > 1).any()  # non-contiguous
    check_invariants(pool)
    assert fragmented_pool().alloc_contiguous(16, "adapter-r4-second") is None
    assert fragmented_pool().alloc_contiguous(8, "fits").tolist() == list(range(4, 12))


def test_pool_for_model_cell_is_one_tokens_kv_over_all_layers():
    config = tiny_llama().config  # 2 layers, 2 KV heads, head_dim 8
    pool = UnifiedPool.for_model(config, budget_bytes=10_000, dtype=torch.float32)
    assert pool.cell_bytes == 2 * 2 * 2 * 8 * 4
    assert pool.cells == 10_000 // 256
    assert pool.cells_for_bytes(256) == 1 and pool.cells_for_bytes(257) == 2
    assert UnifiedPool.for_model(config, 10_000, torch.bfloat16).cell_bytes == 128
