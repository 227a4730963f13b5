"""`lorakit.merge_adapters`: exact linear/cat merges, SVD/TIES/DARE baselines, LoRA-LEGO (the spec's
recipe), DoRA, PEFT loading, the report and the CLI."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from peft.utils import merge_utils

import lorakit
from conftest import tiny_llama
from lorakit.cli.main import main as cli_main
from lorakit.core.errors import ConfigError
from lorakit.merge import baselines, merge_adapters
from lorakit.merge.lego import canonical_order, kmeans, lego_factors

INPUT = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))


def saved_adapter(folder, config, seed: int):
    """A tiny Llama with `config`, every adapter tensor random (seeded), saved to `folder`."""
    model = lorakit.inject(tiny_llama(0), config, progress=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator) + (1.0 if param.dim() == 1 else 0.0))
    lorakit.save_adapter(model, folder)
    return folder


def deltas(folder) -> dict[str, torch.Tensor]:
    """Each layer's dW (float64) of the adapter in `folder`, loaded by lorakit onto tiny_llama(0)."""
    model = lorakit.load_adapter(tiny_llama(0), folder)
    return {path: layer.adapters["default"].double().delta_weight(layer.weight_out_in().double())
            for path, layer in lorakit.core.adapted_layers(model)}


def weighted_sum(folders, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for folder, w in zip(folders, weights):
        for path, delta in deltas(folder).items():
            total[path] = total.get(path, 0) + w * delta
    return total


def assert_deltas_close(got: dict, expected: dict, tol: float) -> None:
    assert set(got) == set(expected)
    for path in expected:
        scale = max(expected[path].abs().max().item(), 1e-12)
        assert (got[path] - expected[path]).abs().max().item() <= tol * scale, path


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """rsLoRA r=4 with a rank pattern on attention, and plain LoRA r=2 on other (overlapping) targets."""
    root = tmp_path_factory.mktemp("inputs")
    first = saved_adapter(root / "a", lorakit.LoraConfig(r=4, alpha=6.0, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                                         rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 2.0}), seed=1)
    second = saved_adapter(root / "b", lorakit.LoraConfig(r=2, alpha=5.0, target_modules=["q_proj", "up_proj"]), seed=2)
    return first, second


# --- the MSU properties and the exact merges ---------------------------------------------------------

def test_concatenation_summation_and_permutation_are_exact():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    A2, B2 = torch.randn(5, 16, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64)
    B, A = baselines.cat([A1, A2], [B1, B2], [1.0, 1.0])
    assert (B @ A - (B1 @ A1 + B2 @ A2)).abs().max() < 1e-12
    perm = torch.randperm(8, generator=g)
    assert (B[:, perm] @ A[perm] - B @ A).abs().max() < 1e-12


def test_linear_is_the_weighted_sum_of_updates_with_rslora_patterns_and_negative_weights(tmp_path, two_adapters):
    weights = [0.7, -1.3]
    report = merge_adapters(two_adapters, "linear", weights, tmp_path / "out")
    assert_deltas_close(deltas(tmp_path / "out"), weighted_sum(two_adapters, weights), 1e-5)
    ranks = {path.split(".")[-1]: layer["rank"] for path, layer in report.layers.items()}
    assert ranks == {"q_proj": 6, "v_proj": 3, "down_proj": 4, "up_proj": 2}  # exact rank, not padded
    assert report.max_error < 1e-6


def test_cat_is_exact_and_keeps_every_rank(tmp_path, two_adapters):
    report = merge_adapters(two_adapters, "cat", [2.0, -0.5], tmp_path / "out")
    assert_deltas_close(deltas(tmp_path / "out"), weighted_sum(two_adapters, [2.0, -0.5]), 1e-5)
    assert {layer["rank"] for layer in report.layers.values()} == {6, 3, 4, 2}


def test_peft_linear_combination_is_not_the_weighted_sum_ours_is(two_adapters):
    """PEFT's factor-wise 'linear' (sqrt(w s) on A and B, then summed) has cross terms."""
    g = torch.Generator().manual_seed(3)
    A1, B1, A2, B2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in [(4, 10), (8, 4), (4, 10), (8, 4)])
    peft_style = (0.5 ** 0.5 * B1 + 0.5 ** 0.5 * B2) @ (0.5 ** 0.5 * A1 + 0.5 ** 0.5 * A2)
    B, A = baselines.linear([A1, A2], [B1, B2], [0.5, 0.5])
    truth = 0.5 * (B1 @ A1 + B2 @ A2)
    assert (B @ A - truth).abs().max() < 1e-10
    assert (peft_style - truth).abs().max() > 0.1


@pytest.mark.parametrize("method, options, weights", [
    ("linear", {}, None), ("cat", {}, None), ("svd", {}, None), ("ties", {"density": 1.0}, None),
    ("dare", {"density": 1.0}, None), ("lego", {}, None), ("lego", {"param_norm": "l2"}, None),
])
def test_merging_copies_of_one_adapter_reproduces_it(tmp_path, two_adapters, method, options, weights):
    source = two_adapters[0]
    report = merge_adapters([source] * 3, method, weights, tmp_path / "out", **options)
    assert_deltas_close(deltas(tmp_path / "out"), deltas(source), 1e-5)
    if method in ("linear", "svd", "lego"):  # the original rank, not 3 times it
        assert {layer["rank"] for layer in report.layers.values()} == {4, 3}


@pytest.mark.parametrize("method, options", [
    ("linear", {}), ("cat", {}), ("svd", {"rank": 3}), ("ties", {"density": 0.3}), ("dare", {"density": 0.5}),
    ("lego", {"rank": 3}),
])
def test_merge_does_not_depend_on_the_order_of_the_inputs(tmp_path, two_adapters, method, options):
    third = saved_adapter(tmp_path / "c", lorakit.LoraConfig(r=3, target_modules=["q_proj", "up_proj"]), seed=3)
    folders, weights = [*two_adapters, third], [0.5, 0.3, 0.9]
    merge_adapters(folders, method, weights, tmp_path / "forward", **options)
    merge_adapters(folders[::-1], method, weights[::-1], tmp_path / "backward", **options)
    assert_deltas_close(deltas(tmp_path / "backward"), deltas(tmp_path / "forward"), 1e-6)


def test_svd_is_the_best_rank_r_approximation_of_the_sum(tmp_path, two_adapters):
    merge_adapters(two_adapters, "svd", [1.0, 1.0], tmp_path / "out", rank=2)
    expected = weighted_sum(two_adapters, [1.0, 1.0])
    for path, delta in deltas(tmp_path / "out").items():
        U, S, Vh = torch.linalg.svd(expected[path], full_matrices=False)
        best = U[:, :2] * S[:2] @ Vh[:2]
        assert (delta - best).abs().max() < 1e-5 * S[0]


# --- TIES and DARE -------------------------------------------------------------------------------------

def test_ties_matches_peft_merge_utils_on_dense_updates():
    g = torch.Generator().manual_seed(4)
    updates = [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    for sign in ("total", "frequency"):
        ours = baselines.ties_delta(updates, weights, 0.3, sign)
        theirs = merge_utils.ties(updates, torch.tensor(weights, dtype=torch.float64), 0.3, sign)
        assert (ours - theirs).abs().max() < 1e-12


def test_dare_drops_entries_and_rescales_the_kept_ones():
    update = torch.randn(200, 100, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dropped = baselines.dare_delta([update], [1.0], density=0.25, seed=0)
    kept = dropped != 0
    assert abs(kept.double().mean().item() - 0.25) < 0.02
    assert torch.allclose(dropped[kept], update[kept] / 0.25)
    assert torch.equal(dropped, baselines.dare_delta([update], [1.0], density=0.25, seed=0))  # seeded
    assert not torch.equal(dropped, baselines.dare_delta([update], [1.0], density=0.25, seed=1))


# --- LoRA-LEGO: the spec's verification recipe (float64) -------------------------------------------------

def rand_lora(rank: int, seed: int, d_in: int = 16, d_out: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, rank, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_lego_identity_merge_of_three_copies(norm):
    A, B = rand_lora(4, 0)
    Bm, Am, info = lego_factors([A] * 3, [B] * 3, k=4, param_norm=norm)
    assert info == {"clusters": 4, "output_factor": 1.0}
    assert (Bm @ Am - B @ A).abs().max() < 1e-10


def test_lego_singletons_give_the_sum_and_output_reweighting_scales_it():
    (A1, B1), (A2, B2) = rand_lora(3, 1), rand_lora(5, 2)
    B, A, _ = lego_factors([A1, A2], [B1, B2], k=8, output_reweight=False)
    assert (B @ A - (B1 @ A1 + B2 @ A2)).abs().max() < 1e-10
    B, A, info = lego_factors([A1, A2], [B1, B2], k=8)
    assert info["output_factor"] == math.sqrt(4 / 8)
    assert (B @ A - math.sqrt(4 / 8) * (B1 @ A1 + B2 @ A2)).abs().max() < 1e-10


@pytest.mark.parametrize("norm, expected", [("l2", None), ("linf", (1.0, 1.0))])
def test_lego_parameter_reweighting_undoes_norm_decay(norm, expected):
    # u1 = e1 (all in a), u2 = e2 (all in b), d_in = d_out = 1; one cluster; raw centroid (1/2, 1/2).
    As, Bs = [torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)], \
             [torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)]
    B, A, _ = lego_factors(As, Bs, k=1, param_norm=norm, output_reweight=False, feature="raw")
    centroid = torch.cat([A.flatten(), B.flatten()])
    if norm == "l2":
        assert abs(centroid.norm().item() - 1.0) < 1e-12
    else:
        assert torch.allclose(centroid, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_lego_prunes_one_lora():
    A, B = rand_lora(8, 3)
    Bm, Am, _ = lego_factors([A], [B], k=8)
    assert (Bm @ Am - B @ A).abs().max() < 1e-10
    Bm, Am, info = lego_factors([A], [B], k=4)
    assert Am.shape[0] <= 4 and torch.linalg.matrix_rank(Bm @ Am) <= 4
    assert info["output_factor"] == math.sqrt(8 / info["clusters"])


def test_lego_without_reweighting_uses_plain_centroids():
    (A1, B1), (A2, B2) = rand_lora(4, 4), rand_lora(4, 5)
    B, A, _ = lego_factors([A1, A2], [B1, B2], k=3, param_reweight=False, output_reweight=False)
    raw = torch.cat([torch.cat([A1, B1.T], 1), torch.cat([A2, B2.T], 1)])
    # every written unit is the mean of a non-empty subset of the pool: the subsets partition the pool
    units = torch.cat([A, B.T], 1)
    features = torch.cat([raw[:, :16] / raw[:, :16].norm(dim=1, keepdim=True),
                          raw[:, 16:] / raw[:, 16:].norm(dim=1, keepdim=True)], 1)
    order = canonical_order(raw)
    labels = kmeans(features[order], 3)
    expected = torch.stack([raw[order][labels == j].mean(0) for j in range(3) if (labels == j).any()])
    assert torch.allclose(units, expected, atol=1e-12)


def test_kmeans_plus_plus_never_seeds_two_clusters_on_duplicates():
    points = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=torch.float64)
    for seed in range(5):
        labels = kmeans(points, 3, seed=seed)
        assert len({tuple(labels[i:i + 5].tolist()) for i in (0, 5, 10)}) == 3
        assert all(len(set(labels[i:i + 5].tolist())) == 1 for i in (0, 5, 10))


# --- DoRA, PEFT, refusals, report, CLI ---------------------------------------------------------------------

def test_merged_adapter_with_per_module_ranks_loads_in_peft_with_the_same_outputs(tmp_path, two_adapters):
    merge_adapters(two_adapters, "cat", [0.6, 0.4], tmp_path / "out")
    ours = logits(lorakit.load_adapter(tiny_llama(0), tmp_path / "out"))
    theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out"))
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - logits(tiny_llama(0))).abs().max() > 1e-3


def test_peft_saved_adapters_merge(tmp_path):
    folders = []
    torch.manual_seed(0)
    for seed, (r, rslora) in enumerate([(4, True), (2, False)]):
        model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=r, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "o_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        model.save_pretrained(tmp_path / f"peft{seed}")
        folders.append(tmp_path / f"peft{seed}")
    merge_adapters(folders, "linear", [1.0, 1.0], tmp_path / "out")
    assert_deltas_close(deltas(tmp_path / "out"), weighted_sum(folders, [1.0, 1.0]), 1e-5)


def test_dora_merges_exactly_with_linear_and_is_refused_by_approximate_methods(tmp_path):
    dora = saved_adapter(tmp_path / "dora", lorakit.LoraConfig(r=3, use_dora=True, target_modules=["q_proj", "down_proj"]), seed=6)
    plain = saved_adapter(tmp_path / "plain", lorakit.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]), seed=7)
    weights = [0.6, 0.7]
    report = merge_adapters([dora, plain], "linear", weights, tmp_path / "out", model=tiny_llama(0))
    assert report.dora and report.max_error < 1e-5
    assert_deltas_close(deltas(tmp_path / "out"), weighted_sum([dora, plain], weights), 1e-5)
    ours = logits(lorakit.load_adapter(tiny_llama(0), tmp_path / "out"))
    theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out"))
    assert (ours - theirs).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="DoRA"):
        merge_adapters([dora, plain], "svd", weights, tmp_path / "svd", model=tiny_llama(0))


def test_refusals_name_the_fix(tmp_path, two_adapters):
    vera = tmp_path / "vera"
    model = lorakit.inject(tiny_llama(0), lorakit.VeraConfig(r=4, target_modules=["q_proj"]), progress=False)
    lorakit.save_adapter(model, vera)
    with pytest.raises(ConfigError, match="--to lora --rank"):
        merge_adapters([vera], "linear", None, tmp_path / "a")
    with pytest.raises(ConfigError, match="options are"):
        merge_adapters(two_adapters, "linear", None, tmp_path / "b", density=0.5)
    with pytest.raises(ConfigError, match="one weight per adapter"):
        merge_adapters(two_adapters, "linear", [1.0], tmp_path / "c")
    with pytest.raises(ConfigError, match="density"):
        merge_adapters(two_adapters, "ties", None, tmp_path / "d", density=0.0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        merge_adapters(two_adapters, "linear", None, tmp_path / "full")


def test_report_and_cli(tmp_path, two_adapters, capsys):
    code = cli_main(["merge", *map(str, two_adapters), "--method", "lego", "--weights", "1", "0.5", "--rank", "3",
                     "--param-norm", "l2", "--no-output-reweight", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["method"] == "lego" and report["weights"] == [1.0, 0.5]
    assert report["options"]["rank"] == 3 and report["options"]["param_norm"] == "l2"
    assert report["options"]["output_reweight"] is False
    assert {layer["rank"] for layer in report["layers"].values()} <= {1, 2, 3}
    assert all({"rank", "error", "distance_from_sum"} <= set(layer) for layer in report["layers"].values())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert cli_main(["merge", str(two_adapters[0]), "--method", "linear", "--density", "0.3", "--out", str(tmp_path / "bad")]) == 2
