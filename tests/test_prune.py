"""LoRAPrune (arXiv 2305.18403): the spec's verification recipe, saving, the CLI and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import model_output
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.core.errors import ConfigError
from lorakit.core.inject import adapted_layers
from lorakit.prune import element_importance, lora_weight_gradient, perplexity, sparsity_at
from lorakit.prune.importance import heads_to_kv_groups, module_scores
from lorakit.prune.loraprune import ADAPTER_NAME, PruneOptions, _Importance
from lorakit.prune.structure import OutputMasks, decoder_groups, prune_layer, update_config


def llama(layers: int = 4, heads: int = 4, kv: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batches(n: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 10), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def inject_lora(model, seed: int = 1) -> None:
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]),
                   name=ADAPTER_NAME, progress=False)
    torch.manual_seed(seed)
    for _, layer in adapted_layers(model):
        torch.nn.init.normal_(layer.adapters[ADAPTER_NAME].lora_B.weight, std=0.1)  # a non-zero update to merge


# --- 1. the estimate, by hand ------------------------------------------------------------------
def test_importance_matches_hand_computed_estimate_float64():
    W = torch.tensor([[1., -2, 0, 3], [2, 1, -1, 0], [0, 4, 1, -3]], dtype=torch.float64)
    A = torch.tensor([[1., 0, -1, 2], [0, 1, 1, -1]], dtype=torch.float64)
    B = torch.tensor([[1., 2], [-1, 0], [3, 1]], dtype=torch.float64)
    GA = torch.tensor([[0., 1, 2, -1], [1, -2, 0, 1]], dtype=torch.float64)
    GB = torch.tensor([[2., -1], [0, 1], [1, 1]], dtype=torch.float64)
    s = 2.0
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            g = sum(GB[i, k] * A[k, j] + B[i, k] * GA[k, j] - GB[i, k] * GA[k, j] for k in range(2))
            merged = W[i, j] + s * sum(B[i, k] * A[k, j] for k in range(2))
            expected[i, j] = abs(g * merged)
    # entry (0, 0) by hand: G_hat = 2 + 2 - (-1) = 5, W + s B A = 1 + 2 * 1 = 3, so I = 15
    assert expected[0, 0] == 15.0
    got = element_importance("lora", W, A, B, s, GA, GB)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # G_hat is exactly how much B A moves under one unit SGD step on A and B (no s factor).
    torch.testing.assert_close(lora_weight_gradient(A, B, GA, GB), B @ A - (B - GB) @ (A - GA), atol=1e-12, rtol=0)


def test_criterion_sanity_zero_b_and_zero_gradients():
    torch.manual_seed(0)
    W, A, GA, GB = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3, 7), torch.randn(5, 3)
    B = torch.zeros(5, 3)
    # chain rule at B = 0 (LoRA's initialisation): G_A = s B^T G_W = 0, G_B = s G_W A^T
    G_W, s = torch.randn(5, 7), 2.0
    torch.testing.assert_close(lora_weight_gradient(A, B, s * B.T @ G_W, s * G_W @ A.T), (s * G_W @ A.T) @ A)
    zero = element_importance("lora", W, A, torch.randn(5, 3), 2.0, torch.zeros_like(GA), torch.zeros_like(GB))
    assert torch.count_nonzero(zero) == 0
    torch.testing.assert_close(element_importance("magnitude", W, A, B, 2.0), W.abs())


def test_module_scores_fan_in_transpose_heads_and_unit_norm():
    importance = torch.arange(24.0).reshape(4, 6)  # (out=4, in=6)
    out_scores = module_scores(importance, fan_in=False)
    torch.testing.assert_close(out_scores, importance.sum(1) / importance.sum(1).norm())
    in_heads = module_scores(importance, fan_in=True, head_dim=3)  # 6 input channels = 2 heads of 3
    per_head = importance.sum(0).reshape(2, 3).sum(1)
    torch.testing.assert_close(in_heads, per_head / per_head.norm())
    torch.testing.assert_close(heads_to_kv_groups(torch.tensor([1.0, 2, 3, 4, 5, 6]), 3), torch.tensor([3.0, 7, 11]))


# --- 2. schedule ----------------------------------------------------------------------------------
def test_cubic_schedule_values():
    values = [sparsity_at(t, 100, 0.1, 0.1, 0.0, 0.5) for t in (10, 50, 91)]
    assert values[0] == 0.0
    assert abs(values[1] - 0.4375) < 1e-12
    assert abs(values[2] - 0.5) < 1e-12


# --- 3. masks only grow; final fraction; exempt layers ---------------------------------------------
def test_masks_only_grow_and_exempt_layers_stay_whole():
    model = llama(layers=10)
    inject_lora(model)
    groups = decoder_groups(model)
    for group in groups[:1] + groups[-1:]:
        group.prunable = False
    options = PruneOptions(prune_freq=5)
    scores = _Importance(groups, options)
    generator = torch.Generator().manual_seed(0)
    layers = [layer for _, layer in adapted_layers(model)]
    previous = {g.index: (g.kv_mask.clone(), g.channel_mask.clone()) for g in groups}
    for step in range(50):
        for layer in layers:
            for param in layer.adapters[ADAPTER_NAME].parameters():
                param.grad = torch.randn(param.shape, generator=generator)
        assert scores.update()
        sparsity = sparsity_at(step, 50, 0.1, 0.1, 0.0, 0.5)
        if step % options.prune_freq == 0 and 0.0 < sparsity <= 0.5:
            scores.apply(sparsity)
        for group in groups:
            old_kv, old_ch = previous[group.index]
            assert torch.all(group.kv_mask <= old_kv) and torch.all(group.channel_mask <= old_ch)
            previous[group.index] = (group.kv_mask.clone(), group.channel_mask.clone())
    scores.apply(0.5)
    for group in groups:
        if group.prunable:
            assert int((group.kv_mask == 0).sum()) == math.floor(4 * 0.5)
            assert int((group.channel_mask == 0).sum()) == math.floor(24 * 0.5)
        else:
            assert bool(group.kv_mask.all()) and bool(group.channel_mask.all())


def test_kv_group_scores_add_q_o_heads_of_the_group_to_k_v():
    """GQA aggregation against an explicit recomputation: KV head j owns query heads j*n_rep .. ."""
    model = llama(layers=2, heads=4, kv=2)
    inject_lora(model)
    groups = decoder_groups(model)
    options = PruneOptions(ema=0.0)
    scores = _Importance(groups, options)
    model.train()
    model(**batches(1)[0]).loss.backward()
    assert scores.update()
    group = groups[1]
    hd = group.head_dim

    def importance(name):
        layer = group.module(name)
        adapter = layer.adapters[ADAPTER_NAME]
        A, B = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
        g_hat = adapter.lora_B.weight.grad @ A + B @ adapter.lora_A.weight.grad - adapter.lora_B.weight.grad @ adapter.lora_A.weight.grad
        return (g_hat * (layer.weight_out_in() + adapter.scaling * B @ A)).abs().double()

    def unit(v):
        return v / (v.norm() + 1e-8)

    q = unit(torch.stack([importance("q_proj")[h * hd:(h + 1) * hd].sum() for h in range(4)]))
    o = unit(torch.stack([importance("o_proj")[:, h * hd:(h + 1) * hd].sum() for h in range(4)]))
    k = unit(torch.stack([importance("k_proj")[j * hd:(j + 1) * hd].sum() for j in range(2)]))
    v = unit(torch.stack([importance("v_proj")[j * hd:(j + 1) * hd].sum() for j in range(2)]))
    expected = torch.stack([k[j] + v[j] + q[2 * j] + q[2 * j + 1] + o[2 * j] + o[2 * j + 1] for j in range(2)])
    torch.testing.assert_close(scores.kv[1], expected, atol=1e-5, rtol=1e-5)
    channels = sum(unit(importance(n).sum(1)) for n in ("gate_proj", "up_proj")) + unit(importance("down_proj").sum(0))
    torch.testing.assert_close(scores.channels[1], channels, atol=1e-5, rtol=1e-5)


# --- 4. prune equivalence ----------------------------------------------------------------------
def analytic_parameters(config, heads: int, kv: int, channels: int) -> int:
    hidden, hd, vocab = config.hidden_size, config.head_dim, config.vocab_size
    per_layer = 2 * hidden * heads * hd + 2 * hidden * kv * hd + 3 * hidden * channels + 2 * hidden
    head = 0 if config.tie_word_embeddings else vocab * hidden
    return vocab * hidden + head + hidden + config.num_hidden_layers * per_layer


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_physically_pruned_model_equals_masked_model(heads, kv, input_ids):
    model = llama(layers=4, heads=heads, kv=kv)
    inject_lora(model)
    groups = decoder_groups(model)
    generator = torch.Generator().manual_seed(3)
    for group in groups:
        group.kv_mask = torch.ones(kv)
        group.kv_mask[torch.randperm(kv, generator=generator)[: kv // 2]] = 0
        group.channel_mask = torch.ones(24)
        group.channel_mask[torch.randperm(24, generator=generator)[:12]] = 0
    masks = OutputMasks(groups)
    ids = input_ids % 64
    masked = model_output(model, ids)
    masks.remove()
    lorakit.unload(model, merge_active=True)
    for group in groups:
        prune_layer(group)
    assert update_config(model, groups)
    pruned = model_output(model, ids)
    assert (masked - pruned).abs().max() < 1e-4
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (heads // 2, kv // 2, 12)
    assert sum(p.numel() for p in model.parameters()) == analytic_parameters(config, heads // 2, kv // 2, 12)
    fresh = LlamaForCausalLM(config)  # the config alone rebuilds these shapes
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# --- end to end ----------------------------------------------------------------------------------
def test_prune_saves_a_smaller_model_that_transformers_reloads_identically(tmp_path, input_ids):
    model = llama(layers=2, heads=4, kv=2)
    data = batches(3)
    out = tmp_path / "pruned"
    pruned = lorakit.prune(model, 0.5, data=data, eval_data=data[:1], steps=12, prune_freq=3, out_dir=out, progress=False)
    report = pruned.prune_report
    assert report["kept_heads_per_layer"] == [2, 2] and report["kept_kv_heads_per_layer"] == [1, 1]
    assert report["kept_channels_per_layer"] == [12, 12]
    assert report["parameters_after"] < report["parameters_before"]
    assert report["perplexity_before"] > 0 and report["perplexity_after"] > 0
    assert json.loads((out / "prune_report.json").read_text())["parameters_after"] == report["parameters_after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folder left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.intermediate_size == 12
    ids = input_ids % 64
    assert torch.equal(model_output(pruned, ids), model_output(reloaded, ids))
    with pytest.raises(ConfigError, match="not empty"):
        lorakit.prune(llama(layers=2), 0.5, metric="magnitude", steps=0, out_dir=out, progress=False)


def test_exempt_layers_stay_whole_and_mixed_sizes_refuse_to_save(tmp_path):
    model = llama(layers=10, heads=4, kv=2)
    pruned = lorakit.prune(model, 0.5, metric="magnitude", steps=0, exempt_layers=True, progress=False)
    assert pruned.prune_report["kept_heads_per_layer"] == [4] + [2] * 8 + [4]
    assert pruned.prune_report["uniform_layers"] is False
    assert model_output(pruned, torch.arange(8)[None]).shape == (1, 8, 64)  # mixed sizes still run
    from lorakit.prune import save_pruned

    with pytest.raises(ConfigError, match="different sizes"):
        save_pruned(pruned, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_grad_metric_holds_weight_gradients_lora_metric_does_not():
    data = batches(2)
    lora = lorakit.prune(llama(layers=2), 0.5, data=data, steps=2, progress=False).prune_report["importance_memory"]
    grad = lorakit.prune(llama(layers=2), 0.5, data=data, steps=2, metric="grad", progress=False).prune_report["importance_memory"]
    assert lora["gradient_bytes_held"] == lora["lora_gradient_bytes"]
    assert grad["gradient_bytes_held"] == lora["lora_gradient_bytes"] + lora["weight_gradient_bytes"]


def test_perplexity_is_exp_of_the_models_mean_loss():
    model = llama(layers=2)
    batch = batches(1)[0]
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert abs(perplexity(model, [batch]) - math.exp(loss)) < 1e-3 * math.exp(loss)


def test_errors_name_the_problem_and_fix():
    with pytest.raises(ConfigError, match="ratio"):
        lorakit.prune(llama(layers=2), 1.0, data=batches(1), progress=False)
    with pytest.raises(ConfigError, match="pass data"):
        lorakit.prune(llama(layers=2), 0.5, progress=False)
    with pytest.raises(ConfigError, match="unknown prune options"):
        lorakit.prune(llama(layers=2), 0.5, data=batches(1), steps_total=3, progress=False)
    adapted = llama(layers=2)
    lorakit.inject(adapted, lorakit.LoraConfig(), progress=False)
    with pytest.raises(ConfigError, match="already holds adapters"):
        lorakit.prune(adapted, 0.5, data=batches(1), progress=False)


def test_cli_prune_writes_a_model_folder(tiny_model_folder, tmp_path, capsys):
    from lorakit.cli.main import main

    out = tmp_path / "cli-pruned"
    code = main(["prune", "--ratio", "0.5", "--model", str(tiny_model_folder), "--steps", "2", "--examples", "4",
                 "--eval-examples", "2", "--batch-size", "2", "--max-length", "96", "--out", str(out), "--quiet",
                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["ratio"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_attention_heads == 2 and reloaded.config.intermediate_size == 32
    assert (out / "tokenizer.json").exists() and (out / "prune_report.json").exists()


def test_a_failing_batch_leaves_the_model_as_it_was(input_ids):
    model = llama(layers=2)
    before = model_output(model, input_ids % 64)
    bad = [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}]  # no labels: no loss
    with pytest.raises(ConfigError, match="labels"):
        lorakit.prune(model, 0.5, data=bad, steps=1, progress=False)
    assert not lorakit.adapter_configs(model)
    assert torch.equal(model_output(model, input_ids % 64), before)
