"""lorakit.analysis: intruder dimensions (the spec's verification recipe, float64), effective rank,
norm limits, and `analyze` / `lorakit analyze` on a planted adapter and a fine-tuned model folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from lorakit.analysis import (
    analyze,
    effective_rank,
    energy_rank,
    intruder_dimensions,
    intruder_similarities,
    norm_bounds,
)
from lorakit.cli.main import main
from lorakit.core.errors import ConfigError


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


@pytest.fixture
def recipe():
    """Spec base: m = 96, n = 64, sigma_i = 10 * 0.85^i, full column rank; u_perp = U[:, 80]."""
    generator = torch.Generator().manual_seed(0)
    U, V = _orthogonal(96, generator), _orthogonal(64, generator)
    sigma = 10 * 0.85 ** torch.arange(64, dtype=torch.float64)
    W0 = U[:, :64] @ torch.diag(sigma) @ V.T
    return U, V, sigma, W0


def _plant(recipe, lam: float) -> torch.Tensor:
    U, V, _, W0 = recipe
    return W0 + lam * torch.outer(U[:, 80], V[:, 63])  # dW = s B A with r = 1, s = 1, B = lam u_perp, A = v^T


def test_identical_weights_have_no_intruders_and_unit_similarity(recipe):
    W0 = recipe[3]
    similarity, _ = intruder_similarities(W0, W0)
    assert intruder_dimensions(W0, W0) == []
    torch.testing.assert_close(similarity, torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-10)


def test_strong_orthogonal_plant_is_the_first_intruder(recipe):
    tuned = _plant(recipe, 30.0)
    similarity, _ = intruder_similarities(recipe[3], tuned)
    assert intruder_dimensions(recipe[3], tuned) == [0]
    assert similarity[0] < 1e-3 and bool((similarity[1:] > 0.999).all())


def test_only_the_top_k_singular_vectors_are_examined(recipe):
    tuned = _plant(recipe, 2.0)  # between sigma_10 = 1.97 and sigma_9 = 2.32: the plant ranks 11th
    assert recipe[2][9] > 2.0 > recipe[2][10]
    assert intruder_dimensions(recipe[3], tuned, top_k=10) == []
    assert intruder_dimensions(recipe[3], tuned, top_k=12) == [10]


def test_rotation_of_existing_directions_is_not_an_intruder_at_the_default_threshold(recipe):
    U, V, sigma, W0 = recipe
    angle = math.pi / 4
    R = torch.eye(64, dtype=torch.float64)
    R[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    rotated = (U[:, :64] @ R) @ torch.diag(sigma) @ V.T
    similarity, _ = intruder_similarities(W0, rotated)
    assert intruder_dimensions(W0, rotated) == []
    torch.testing.assert_close(similarity[:2], torch.full((2,), 0.5**0.5, dtype=torch.float64), rtol=0, atol=1e-6)
    assert intruder_dimensions(W0, rotated, threshold=0.75) == [0, 1]  # not rotation-invariant inside a block


def test_dense_small_noise_like_full_fine_tuning_has_no_intruders(recipe):
    noise = torch.randn(96, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert intruder_dimensions(recipe[3], recipe[3] + 0.01 * noise) == []


def test_square_uniform_mix_is_an_intruder_only_when_large():
    generator = torch.Generator().manual_seed(2)
    U, V = _orthogonal(64, generator), _orthogonal(64, generator)
    W0 = U @ torch.diag(10 * 0.85 ** torch.arange(64, dtype=torch.float64)) @ V.T
    mix = torch.outer(U.sum(1) / 8, V.sum(1) / 8)
    similarity, _ = intruder_similarities(W0, W0 + 30 * mix)
    assert intruder_dimensions(W0, W0 + 30 * mix) == [0]
    assert 0.1 < similarity[0] < 0.3  # spec: ~0.18
    assert intruder_dimensions(W0, W0 + 5 * mix) == []


def test_similarities_match_a_direct_float64_svd_computation():
    generator = torch.Generator().manual_seed(3)
    W0 = torch.randn(40, 24, generator=generator, dtype=torch.float64)
    B, A = (torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((40, 2), (2, 24)))
    tuned = W0 + 3 * B @ A
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    Ut = torch.linalg.svd(tuned, full_matrices=False)[0]
    expected = (Ut.T @ U0).abs().max(dim=1).values[:10]
    similarity, _ = intruder_similarities(W0.float(), tuned.float())  # float32 inputs are analysed in float64
    torch.testing.assert_close(similarity, expected, rtol=0, atol=1e-5)
    assert intruder_dimensions(W0, tuned) == [j for j in range(10) if expected[j] < 0.5]


def test_bad_inputs_raise_errors_that_name_the_fix():
    with pytest.raises(ConfigError, match="differ in shape"):
        intruder_dimensions(torch.zeros(4, 3), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="top_k"):
        intruder_dimensions(torch.eye(4), torch.eye(4), top_k=0)
    with pytest.raises(ConfigError, match="threshold"):
        intruder_dimensions(torch.eye(4), torch.eye(4), threshold=1.5)


def test_effective_rank_and_energy_rank_on_known_spectra():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert effective_rank(4 * p) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1  # 9 of 10
    assert energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.95) == 2
    assert energy_rank(torch.linalg.svdvals(torch.eye(5)), 0.9) == 5


def test_norm_bounds_match_the_spec_closed_form():
    L, d = 64, 8
    x = 0.5 * torch.ones(L, d)
    B, A = torch.ones(d, 1), torch.ones(1, d) / d
    bounds = norm_bounds(x, torch.eye(d), 2.0 * B @ A)
    assert (bounds.gamma_base, bounds.gamma_adapter, bounds.gamma_effective) == pytest.approx((0.5, 1.0, 1.5), rel=1e-12)
    assert bounds.gamma == pytest.approx(1.0)
    assert bounds.rho_effective == pytest.approx(1.5 / math.sqrt(math.log(64)), rel=1e-6)
    assert bounds.rho_effective == pytest.approx(0.735534, rel=1e-6)  # the spec's "0.73556" is a rounding slip
    assert bounds.below_threshold
    with pytest.raises(ConfigError, match="does not fit"):
        norm_bounds(torch.ones(4, 3), torch.eye(8), torch.zeros(8, 8))


# --- analyze / lorakit analyze on a tiny model -------------------------------------------------

PLANTED = "model.layers.0.self_attn.q_proj"
ROTATED = "model.layers.1.mlp.down_proj"


def _set_update(adapter, delta: torch.Tensor) -> None:
    """Write `delta` (rank <= adapter.r) into a LoRA adapter's factors."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = adapter.r
    adapter.lora_B.weight.copy_((U[:, :r] * S[:r].sqrt() / adapter.scaling).float())
    adapter.lora_A.weight.copy_((S[:r].sqrt()[:, None] * Vh[:r]).float())


@pytest.fixture(scope="module")
def planted_adapter(tiny_model_folder, tmp_path_factory):
    """LoRA r=4 (rank_pattern: r=1 on PLANTED, r=2 on ROTATED): PLANTED gets a large uniform mix of
    all its base directions (an intruder), ROTATED a 45 degree rotation of its top two left
    singular vectors (not an intruder), every other layer a small random update."""
    model, _ = lorakit.models.load(tiny_model_folder)
    config = lorakit.LoraConfig(r=4, alpha=8.0, rank_pattern={"layers.0.self_attn.q_proj": 1, "layers.1.mlp.down_proj": 2})
    lorakit.inject(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, layer in lorakit.core.adapted_layers(model):
            adapter = layer.adapters["default"]
            W0 = layer.weight_out_in().double()
            U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
            if path == PLANTED:
                u, v = U.sum(1) / U.shape[1] ** 0.5, Vh.sum(0) / Vh.shape[0] ** 0.5
                _set_update(adapter, 20 * S[0] * torch.outer(u, v))
            elif path == ROTATED:
                c = s = 0.5**0.5
                rotated = U.clone()
                rotated[:, 0], rotated[:, 1] = c * U[:, 0] + s * U[:, 1], -s * U[:, 0] + c * U[:, 1]
                _set_update(adapter, (rotated - U) @ torch.diag(S) @ Vh)
            else:
                adapter.lora_B.weight.normal_(0, 1e-3, generator=generator)
    folder = tmp_path_factory.mktemp("planted") / "adapter"
    lorakit.save_adapter(model, folder)
    return folder


def test_analyze_finds_the_planted_intruder_and_not_the_rotation(planted_adapter, tiny_model_folder, tmp_path):
    out = tmp_path / "report"
    report = analyze(planted_adapter, str(tiny_model_folder), out, norm_examples=2, progress=False, log=None)
    layers = {layer.name: layer for layer in report.layers}
    assert len(layers) == 14  # 2 decoder layers x 7 linear modules
    assert layers[PLANTED].intruders == [0]
    assert layers[ROTATED].intruders == []
    assert layers[ROTATED].similarities[0] == pytest.approx(0.5**0.5, abs=1e-4)
    assert report.total_intruders == 1
    assert layers[PLANTED].effective_rank == pytest.approx(1.0, abs=1e-3)
    assert layers[ROTATED].energy_rank_90 == 2
    # each layer's adapter rank, from rank_pattern
    assert layers[PLANTED].rank == 1 and layers[ROTATED].rank == 2
    assert {layer.rank for name, layer in layers.items() if name not in (PLANTED, ROTATED)} == {4}
    # norm check on q/k/v only, with rho = Gamma / sqrt(ln L) and Gamma = max(base, adapter)
    normed = {name for name, layer in layers.items() if layer.norms}
    assert normed == {name for name in layers if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}
    norms = layers[PLANTED].norms
    assert norms["gamma"] == max(norms["gamma_base"], norms["gamma_adapter"])
    assert norms["rho"] == pytest.approx(norms["gamma"] / math.sqrt(math.log(norms["length"])))
    assert norms["gamma_effective"] <= norms["gamma_base"] + norms["gamma_adapter"] + 1e-9
    # files: JSON mirrors the report, text report and PNG exist, no staging folder left behind
    data = json.loads((out / "analysis.json").read_text())
    assert data["total_intruders"] == 1 and data["method"] == "lora"
    assert {row["name"]: row["rank"] for row in data["layers"]}[PLANTED] == 1
    assert (out / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert PLANTED in (out / "report.txt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_analyze_leaves_the_base_model_as_it_was(planted_adapter, tiny_model_folder):
    model, _ = lorakit.models.load(tiny_model_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze(planted_adapter, model, None, norm_examples=0, progress=False, log=None)
    assert report.total_intruders == 1
    assert lorakit.adapter_configs(model) == {}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_analyze_a_fully_fine_tuned_model_folder(tiny_model_folder, tmp_path):
    model, tokenizer = lorakit.models.load(tiny_model_folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        W = model.get_submodule(PLANTED).weight
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        W += (20 * S[0] * torch.outer(U.sum(1), Vh.sum(0)) / U.shape[1]).float()  # intruder
        noisy = model.get_submodule("model.layers.1.self_attn.v_proj").weight
        noisy += 1e-3 * torch.randn(noisy.shape, generator=generator)  # dense small change: none
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    tokenizer.save_pretrained(tuned)
    report = analyze(tuned, str(tiny_model_folder), None, norm_examples=1, progress=False, log=None)
    assert report.kind == "full" and report.method is None
    assert [layer.name for layer in report.layers] == [PLANTED, "model.layers.1.self_attn.v_proj"]
    assert [layer.intruders for layer in report.layers] == [[0], []]
    assert report.unchanged_layers == 12 and all(layer.rank is None for layer in report.layers)
    assert all(layer.norms is not None for layer in report.layers)
    with pytest.raises(ConfigError, match="--base"):
        analyze(tuned, None, None, progress=False, log=None)


def test_cli_analyze_writes_into_an_existing_folder_without_touching_other_files(planted_adapter, tiny_model_folder,
                                                                                  tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["analyze", str(planted_adapter), "--base", str(tiny_model_folder), "--out", str(out),
                 "--norm-examples", "0", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "intruder dimensions (top-10 singular vectors, cosine threshold 0.5): 1 in 1 of 14 layers" in printed
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "keep.txt", "report.txt", "spectra.png"]
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["analyze", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
