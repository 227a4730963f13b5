"""Weight quantization (lorakit.quant): RTN, CBQ's CFP, LoRA-Rounding, cross-block windows, storage.

The checks follow the verification recipe of ../shared/methods/cbq-lora-rounding.md."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import lorakit
from lorakit.core.errors import ConfigError
from lorakit.quant import (
    LoRARounding,
    QuantizedLinear,
    cfp,
    load_quantized,
    quantize,
    reconstruction_loss,
    save_quantized,
    window_schedule,
)
from lorakit.quant.quantizer import (
    beta_schedule,
    dequantize,
    group_params,
    pack_codes,
    rectified_sigmoid,
    rounding_regulariser,
    rtn_codes,
    unpack_codes,
)


def _calibration(n: int = 4, seq: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(2, seq, dtype=torch.long)
        mask[1, seq - 3:] = 0  # one padded row: padding must not count in the loss
        batches.append({"input_ids": torch.randint(0, 128, (2, seq), generator=g), "attention_mask": mask})
    return batches


def test_rectified_sigmoid_limits_and_floor_ceil_rounding():
    h = rectified_sigmoid(torch.tensor([20.0, -20.0, 0.0]))
    torch.testing.assert_close(h, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6, rtol=0)
    layer = nn.Linear(24, 6, bias=False)
    rounding = LoRARounding(layer, bits=4, group_size=8, rank=2)
    s = rounding.step().repeat_interleave(8, dim=1)
    z = rounding.zero.repeat_interleave(8, dim=1)
    w = layer.weight.detach()
    up = rounding.soft_weight(torch.ones_like(w))
    down = rounding.soft_weight(torch.zeros_like(w))
    torch.testing.assert_close(up, s * (torch.clamp(torch.ceil(w / s) + z, 0, 15) - z))
    torch.testing.assert_close(down, s * (torch.clamp(torch.floor(w / s) + z, 0, 15) - z))


def test_lora_rounding_learns_r_times_out_plus_in_rounding_parameters():
    rounding = LoRARounding(nn.Linear(128, 64), bits=4, group_size=-1, rank=4)
    assert rounding.A1.numel() + rounding.A2.numel() == 768  # 4 * (64 + 128), not 64 * 128
    assert rounding.log_step.shape == (64, 1)  # one learnt step per (row, group)


@pytest.mark.parametrize("bits,group_size,in_features", [(4, 16, 48), (3, 16, 40), (2, -1, 24), (8, 32, 70)])
def test_rtn_matches_the_closed_form_and_errs_by_at_most_half_a_step(bits, group_size, in_features):
    torch.manual_seed(bits)
    w = torch.randn(5, in_features)
    scale, zero = group_params(w, bits, group_size)
    codes = rtn_codes(w, scale, zero, bits, group_size)
    # float64 reference, group by group (the last group may be narrower)
    width = in_features if group_size == -1 else group_size
    q_max = 2 ** bits - 1
    for g, start in enumerate(range(0, in_features, width)):
        block = w[:, start:start + width].double()
        lo, hi = block.min(dim=1).values, block.max(dim=1).values
        s = (hi - lo) / q_max
        z = torch.clamp(torch.round(-lo / s), 0, q_max)
        ref = torch.clamp(torch.round(block / s[:, None]) + z[:, None], 0, q_max)
        torch.testing.assert_close(scale[:, g].double(), s, rtol=1e-6, atol=0)
        assert torch.equal(codes[:, start:start + width].double(), ref)
        deq = dequantize(codes, scale, zero, group_size)[:, start:start + width].double()
        assert ((deq - block).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_stay_in_the_b_bit_range_for_rtn_and_cbq(bits):
    for method in ("rtn", "cbq"):
        model = quantize(tiny_llama(), bits, 16, data=_calibration(2), method=method, epochs=1, progress=False)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 14  # 7 Linear layers in each of the 2 decoder blocks; lm_head stays
        codes = torch.cat([m.codes.reshape(-1) for m in layers])
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
        assert len(torch.unique(codes)) == 2 ** bits  # every level is used
        assert not isinstance(model.lm_head, QuantizedLinear)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_then_unpack_restores_codes(bits):
    codes = torch.randint(0, 2 ** bits, (7, 13), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(7 * 13 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (7, 13)), codes)


@pytest.mark.parametrize("seed", range(5))
def test_cfp_coarse_stage_catches_planted_values_and_fine_stage_keeps_the_extreme_ones(seed):
    g = torch.Generator().manual_seed(seed)
    planted = torch.tensor([8.0, 9.0, 10.0, 40.0, 45.0])
    values = torch.cat([torch.randn(1000, generator=g), planted]).abs()
    coarse, threshold = cfp.coarse_outliers(values, lambda1=1.5)
    assert 2.0 < threshold < 2.8  # Q3 + 1.5 IQR of |N(0,1)| is about 2.4
    assert coarse[-5:].all()
    outliers = values[cfp.outlier_mask(values, lambda1=1.5, lambda2=1.0)]
    assert sorted(outliers.tolist()) == [40.0, 45.0]


def test_weight_truncation_clips_only_outliers_to_the_largest_inlier_magnitude():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=g) * 0.02
    w[3, 4], w[7, 1] = 1.0, -1.2
    original = w.clone()
    count = cfp.truncate_weight_outliers(w)
    assert count == 2
    limit = original.abs()[original.abs() < 0.5].max()
    assert w[3, 4] == limit and w[7, 1] == -limit
    untouched = torch.ones_like(w, dtype=torch.bool)
    untouched[3, 4] = untouched[7, 1] = False
    assert torch.equal(w[untouched], original[untouched])


def test_activation_scaling_preserves_x_w_and_flattens_the_outlier_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    x[:, 5] *= 60.0
    norm, linears = nn.LayerNorm(16, elementwise_affine=True), [nn.Linear(16, 8), nn.Linear(16, 4)]
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
        norm.weight[5] = 30.0  # an outlier channel in the norm's output
        before = [lin(norm(x)) for lin in linears]
        channel_max = norm(x).abs().amax(dim=0)
        scales = cfp.activation_scales(channel_max)
        assert (scales != 1).nonzero().flatten().tolist() == [5]
        cfp.fold_activation_scales(norm, linears, scales)
        after_max = norm(x).abs().amax(dim=0)
        assert after_max[5] <= channel_max[torch.arange(16) != 5].max() * (1 + 1e-5)
        for lin, ref in zip(linears, before):
            torch.testing.assert_close(lin(norm(x)), ref, atol=1e-5, rtol=1e-5)


def test_window_schedule():
    assert window_schedule(5, 2, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert window_schedule(5, 3, 1) == [(0, 1, 2), (2, 3, 4)]
    assert window_schedule(4, 3, 1) == [(0, 1, 2), (2, 3)]
    assert window_schedule(3, 1, 0) == [(0,), (1,), (2,)]
    with pytest.raises(ConfigError, match="overlap"):
        window_schedule(5, 2, 2)


def test_reconstruction_loss_is_zero_on_equal_outputs_and_its_kl_term_non_negative():
    h = torch.randn(2, 5, 8)
    assert reconstruction_loss(h, h).item() == pytest.approx(0.0, abs=1e-7)
    other = torch.randn(2, 5, 8)
    mse = (h - other).pow(2).mean()
    assert reconstruction_loss(h, other).item() >= mse.item() - 1e-6  # KL >= 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = other.clone()
    changed[0, 3:] += 100.0  # padded positions: ignored
    assert reconstruction_loss(h, changed, mask) == pytest.approx(reconstruction_loss(h, other, mask).item())


def test_beta_schedule_warms_up_then_anneals_from_20_to_2():
    assert beta_schedule(0, 100) is None and beta_schedule(19, 100) is None
    assert beta_schedule(20, 100) == pytest.approx(20.0)
    assert beta_schedule(99, 100) == pytest.approx(2.0, abs=0.3)
    h = torch.tensor([0.0, 1.0, 0.5])
    assert rounding_regulariser(h[:2], 2.0) == 0 and rounding_regulariser(h[2:], 2.0) == 1


def test_lora_rounding_beats_round_to_nearest_on_a_single_linear():
    torch.manual_seed(0)
    layer = nn.Linear(128, 64, bias=False)
    nn.init.normal_(layer.weight)
    mixing = torch.eye(128) + 2 * torch.randn(128, 128) / math.sqrt(128)  # correlated inputs
    x = torch.randn(512, 128) @ mixing
    target = layer(x).detach()
    scale, zero = group_params(layer.weight, 4, -1)
    rtn = dequantize(rtn_codes(layer.weight, scale, zero, 4, -1), scale, zero, -1)
    rtn_mse = (x @ rtn.T - target).pow(2).mean()

    rounding = LoRARounding(layer, bits=4, group_size=-1, rank=8)
    optimiser = torch.optim.Adam([{"params": [rounding.A1, rounding.A2], "lr": 1e-2},
                                  {"params": [rounding.log_step], "lr": 1e-3}])
    for step in range(500):  # CBQ's objective: E / E_start + round_weight L_round(beta), defaults lr 1e-2, round_weight 1
        beta = beta_schedule(step, 500)
        loss = (rounding(x) - target).pow(2).mean()
        total = loss / rtn_mse + (0 if beta is None else rounding_regulariser(rounding.soft_h(), beta))
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    codes, steps, zeros = rounding.hard_codes()
    hard = dequantize(codes, steps, zeros, -1)
    assert (x @ hard.T - target).pow(2).mean() <= 0.9 * rtn_mse


def test_cbq_reduces_block_output_error_against_rtn():
    data = _calibration(4)
    fp = tiny_llama()

    def final_hidden(model):
        with torch.no_grad():
            return [model.model(**b).last_hidden_state for b in data]

    reference = final_hidden(fp)
    errors = {}
    for method in ("rtn", "cbq"):
        # the tiny random model needs more steps than the CPU default to binarise its rounding
        model = quantize(tiny_llama(), 3, 16, data=data, method=method, epochs=50, lr=3e-2, progress=False)
        errors[method] = sum((h - r).pow(2).mean() for h, r in zip(final_hidden(model), reference)).item()
        if method == "cbq":
            windows = model._lorakit_quant["report"]["windows"]
            assert windows[-1]["loss_end"] < windows[-1]["loss_start"]
    assert errors["cbq"] < 0.9 * errors["rtn"]


def _with_outlier_channel(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = 40.0
        model.model.layers[1].post_attention_layernorm.weight[7] = 40.0
    return model


def test_cfp_scales_outlier_channels_without_changing_the_full_precision_model(input_ids):
    model = _with_outlier_channel(tiny_llama())
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    from lorakit.quant.cbq import capture_block_inputs, preprocess_block

    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, _calibration(2))
    options = dict(activation_outliers=True, weight_outliers=False, lambda1=1.5, lambda2=1.0)
    result = preprocess_block(block, inputs, options)
    assert result["scaled_channels"] >= 1 and block.input_layernorm in result["norms"]
    assert block.input_layernorm.weight[3] < 40.0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "cbq"])
def test_saved_quantized_model_reloads_to_identical_outputs(method, tmp_path, input_ids):
    model = _with_outlier_channel(tiny_llama())
    quantize(model, 4, 16, data=_calibration(2), method=method, epochs=1, progress=False, out_dir=tmp_path)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert config["bits"] == 4 and config["group_size"] == 16 and config["method"] == method
    if method == "cbq":
        assert config["modified"]  # the scaled norm gains travel with the codes
    reloaded = load_quantized(tmp_path, _with_outlier_channel(tiny_llama()))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, expected)
    report = json.loads((tmp_path / "quant_report.json").read_text())
    assert report["method"] == method and report["seconds"] >= 0


def test_errors_name_the_fix():
    with pytest.raises(ConfigError, match="bits"):
        quantize(tiny_llama(), 1, 16, method="rtn")
    with pytest.raises(ConfigError, match="group_size"):
        quantize(tiny_llama(), 4, 0, method="rtn")
    with pytest.raises(ConfigError, match="calibration data"):
        quantize(tiny_llama(), 4, 16)
    with pytest.raises(ConfigError, match="no quantized layers"):
        save_quantized(tiny_llama(), "unused")
    assert lorakit.quantize is quantize


def test_cli_quantize_writes_a_folder_that_reloads(tiny_model_folder, tmp_path, capsys):
    from lorakit.cli.main import main

    out = tmp_path / "q"
    code = main(["quantize", "--bits", "3", "--group-size", "16", "--model", str(tiny_model_folder), "--samples", "2",
                 "--max-length", "32", "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 3
    model = load_quantized(out, str(tiny_model_folder))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_folder), "--out", str(out), "--quiet"]) == 2
