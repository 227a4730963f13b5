"""`lorakit export`: any family's adapter as a standard LoRA (truncated SVD of dW), and vLLM's shape."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import lorakit
from conformance.cases import CASES
from conformance.test_conformance import TARGETS, adapted, logits, move_off_init
from conftest import tiny_llama
from lorakit.cli.main import main as cli_main
from lorakit.core.errors import ConfigError
from lorakit.export import export_adapter, vllm

FULL_RANK = 32  # >= min(in, out) of every targeted tiny layer (32x32, 16x32, 32x48, 48x32)
PREFIX = "base_model.model."


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def source_deltas(model) -> dict[str, torch.Tensor]:
    """Each layer's dW in float64, recomputed on a float64 copy of the in-memory adapter."""
    return {
        path: copy.deepcopy(layer.adapters["default"]).double().delta_weight(layer.weight_out_in().double())
        for path, layer in lorakit.core.adapted_layers(model)
    }


def saved_lora(tmp_path, config: lorakit.AdapterConfig, for_untouched_base: bool = True):
    """A tiny Llama with `config` moved off its init, saved; returns (model, folder, its logits)."""
    torch.manual_seed(11)
    model = lorakit.inject(tiny_llama(0), config)
    move_off_init(model)
    lorakit.save_adapter(model, tmp_path / "source", for_untouched_base=for_untouched_base)
    return model, tmp_path / "source", logits(model)


@pytest.mark.parametrize("case_name", list(CASES))
def test_export_is_exact_in_lorakit_and_peft_when_rank_covers_the_update(tmp_path, case_name):
    model, _ = adapted(case_name)
    move_off_init(model)
    expected = logits(model)
    lorakit.save_adapter(model, tmp_path / "source")

    report = export_adapter(tiny_llama(0), tmp_path / "source", tmp_path / "out", rank=FULL_RANK)

    assert set(report.errors) == {path for path, _ in lorakit.core.adapted_layers(model)}
    assert report.max_error <= 1e-5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", FULL_RANK, FULL_RANK, False)
    assert max_difference(logits(lorakit.load_adapter(tiny_llama(0), tmp_path / "out")), expected) <= 1e-5
    assert max_difference(logits(peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "out")), expected) <= 1e-5


def test_error_decreases_with_rank_and_equals_the_eckart_young_tail(tmp_path):
    model, source, _ = saved_lora(tmp_path, lorakit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS))
    deltas = source_deltas(model)  # DoRA rescales W, so dW has full rank
    previous = {path: math.inf for path in deltas}
    for rank in (1, 3, 8, 16):
        report = export_adapter(tiny_llama(0), source, tmp_path / f"rank{rank}", rank=rank)
        for path, delta in deltas.items():
            singular = torch.linalg.svdvals(delta)
            tail = (singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt()).item()
            assert report.errors[path] == pytest.approx(tail, abs=1e-6)
            assert report.errors[path] < previous[path]
            previous[path] = report.errors[path]
        assert report.max_error > 1e-3  # rank 16 < 32 = the rank of the square layers' dW


def test_exported_factors_are_balanced_and_zero_padded_beyond_the_layer_rank(tmp_path):
    _, source, _ = saved_lora(tmp_path, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    export_adapter(tiny_llama(0), source, tmp_path / "out", rank=20)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    k_A = tensors[PREFIX + "model.layers.0.self_attn.k_proj.lora_A.weight"]
    k_B = tensors[PREFIX + "model.layers.0.self_attn.k_proj.lora_B.weight"]
    assert k_A.shape == (20, 32) and k_B.shape == (16, 20)  # k_proj is 32 -> 16: rank 16 at most
    assert k_A[16:].abs().max() == 0 and k_B[:, 16:].abs().max() == 0
    assert k_A[4:].abs().max() < 1e-5 and k_B[:, 4:].abs().max() < 1e-5  # dW = s B A has rank 4
    # Balanced: A's rows and B's columns carry the same norm, sqrt(S_i) each.
    assert torch.allclose(k_A[:4].norm(dim=1), k_B[:, :4].norm(dim=0), rtol=1e-4)


def test_vllm_export_pads_rank_pattern_and_bakes_each_module_scaling_into_B(tmp_path):
    config = lorakit.LoraConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"k_proj": 2},
                                alpha_pattern={"down_proj": 3.0}, target_modules=TARGETS)
    model, source, expected = saved_lora(tmp_path, config)
    assert any("rank_pattern" in problem for problem in vllm.folder_problems(source))

    report = export_adapter(tiny_llama(0), source, tmp_path / "out", for_vllm=True)

    out = tmp_path / "out"
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (4, 8 / math.sqrt(4) * 4)  # the config's own scale, 4
    assert not written["rank_pattern"] and not written["alpha_pattern"]
    assert written["use_rslora"] is False and written["use_dora"] is False and written["bias"] == "none"
    assert vllm.folder_problems(out) == [] and report.warnings == [] and report.max_error <= 1e-6
    tensors = load_file(out / "adapter_model.safetensors")
    k_A = tensors[PREFIX + "model.layers.1.self_attn.k_proj.lora_A.weight"]
    k_B = tensors[PREFIX + "model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert k_A.shape == (4, 32) and k_A[2:].abs().max() == 0 and k_B[:, 2:].abs().max() == 0
    # vLLM applies one scaling, lora_alpha / r, to every module and reads nothing else.
    one_scale = written["lora_alpha"] / written["r"]
    for path, delta in source_deltas(model).items():
        served = one_scale * tensors[f"{PREFIX}{path}.lora_B.weight"].double() @ tensors[f"{PREFIX}{path}.lora_A.weight"].double()
        assert ((served - delta).norm() / delta.norm()).item() <= 1e-6
    # Untouched modules keep their B: only the patterned ones were rescaled.
    q_B = tensors[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(q_B, load_file(source / "adapter_model.safetensors")[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert max_difference(logits(peft.PeftModel.from_pretrained(tiny_llama(0), out)), expected) <= 1e-5


def test_vllm_export_refuses_dora_and_names_the_svd_export_that_works(tmp_path):
    _, source, expected = saved_lora(tmp_path, lorakit.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"DoRA.*magnitude.*--to lora --rank R --for vllm"):
        export_adapter(tiny_llama(0), source, tmp_path / "refused", for_vllm=True)
    assert not (tmp_path / "refused").exists()

    report = export_adapter(tiny_llama(0), source, tmp_path / "out", rank=FULL_RANK, for_vllm=True)
    assert report.max_error <= 1e-5 and vllm.folder_problems(tmp_path / "out") == []
    assert "--max-lora-rank 32" in report.warnings[0]  # 32 > vLLM's default max_lora_rank of 16
    assert max_difference(logits(lorakit.load_adapter(tiny_llama(0), tmp_path / "out")), expected) <= 1e-5


def test_vllm_export_refuses_other_families_without_svd(tmp_path):
    _, source, _ = saved_lora(tmp_path, lorakit.BoneConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ConfigError, match=r"'bone' adapter, not a LoRA.*--to lora --rank R --for vllm"):
        export_adapter(tiny_llama(0), source, tmp_path / "refused", for_vllm=True)


def test_peft_style_pissa_file_is_exported_against_the_untouched_base_and_the_model_is_left_as_it_was(tmp_path):
    config = lorakit.LoraConfig(r=4, alpha=8, init="pissa", target_modules=TARGETS)
    _, source, expected = saved_lora(tmp_path, config, for_untouched_base=False)  # factors relative to W_res
    base = tiny_llama(0)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}

    copied = export_adapter(base, source, tmp_path / "vllm", for_vllm=True)
    svd = export_adapter(base, source, tmp_path / "svd", rank=8)

    assert copied.rank == 8 and copied.max_error <= 1e-5 and svd.max_error <= 1e-5  # s (B A - B0 A0): rank 2r
    assert lorakit.adapter_configs(base) == {} and not list(lorakit.core.adapted_layers(base))
    assert all(torch.equal(p, before[name]) and p.requires_grad for name, p in base.named_parameters())
    for out in ("vllm", "svd"):
        assert max_difference(logits(lorakit.load_adapter(tiny_llama(0), tmp_path / out)), expected) <= 1e-5


def test_export_refuses_to_overwrite_a_non_empty_folder_unless_forced(tmp_path):
    _, source, _ = saved_lora(tmp_path, lorakit.LoraConfig(r=2, alpha=4, target_modules=TARGETS))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty.*--force"):
        export_adapter(tiny_llama(0), source, tmp_path / "out", rank=2)
    export_adapter(tiny_llama(0), source, tmp_path / "out", rank=2, force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.fixture
def tiny_model_folder(tmp_path):
    """A tiny Llama and a word-level tokenizer saved as a Hugging Face folder (no downloads)."""
    folder = tmp_path / "tiny-llama"
    tiny_llama(0).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")),
                                        unk_token="w0", eos_token="w1")
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_export_prints_per_layer_errors_and_uses_the_adapters_base_model(tmp_path, tiny_model_folder, capsys):
    model, _ = lorakit.models.load(tiny_model_folder)
    lorakit.inject(model, lorakit.BoneConfig(r=4, target_modules=TARGETS))
    move_off_init(model)
    lorakit.save_adapter(model, tmp_path / "bone")  # base_model_name_or_path names tiny_model_folder
    out = str(tmp_path / "out")

    assert cli_main(["export", str(tmp_path / "bone"), "--to", "lora", "--rank", "2", "--out", out, "--quiet"]) == 0
    assert "max relative error" in capsys.readouterr().out
    assert cli_main(["export", str(tmp_path / "bone"), "--to", "lora", "--rank", "2", "--out", out]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "bone"), "--to", "lora", "--rank", "32", "--for", "vllm",
                     "--model", str(tiny_model_folder), "--out", out, "--force"]) == 0
    printed = capsys.readouterr()
    table = printed.out.splitlines()
    assert table[0].split() == ["layer", "relative", "error"]
    assert len(table) == 1 + 8 + 2 and all(line.split()[0] in printed.out for line in table[1:9])
    assert ": exact" in printed.out and "--max-lora-rank 32" in printed.err
    assert vllm.folder_problems(out) == []

    assert cli_main(["export", str(tmp_path / "bone"), "--for", "vllm", "--out", str(tmp_path / "x")]) == 2
    assert "--to lora --rank R --for vllm" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "bone"), "--rank", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--to lora and --rank R go together" in capsys.readouterr().err
