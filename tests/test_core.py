"""Core behaviour: config validation, target matching, adapter sets, merge/unload, file errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama
from lorakit.core import adapted_layers

INPUT = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def randomise_adapters(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(
    "field, value, fragment",
    [("r", 0, "r=0"), ("r", -2, "positive integer"), ("alpha", 0, "alpha=0"), ("dropout", 1.0, "[0.0, 1.0)"),
     ("dropout", -0.1, "dropout"), ("init", "xavier", "'default', 'gaussian', 'pissa', 'olora'")],
)
def test_bad_config_values_name_the_field_and_allowed_values(field, value, fragment):
    with pytest.raises(lorakit.ConfigError, match=None) as info:
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(**{field: value}))
    assert field in str(info.value) and fragment in str(info.value)


def test_target_matching_exact_suffix_regex_and_all_linear():
    def targets(spec):
        model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=spec))
        return sorted(path for path, _ in adapted_layers(model))

    assert targets(["model.layers.0.self_attn.q_proj"]) == ["model.layers.0.self_attn.q_proj"]
    assert targets(["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert targets(r".*\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    all_linear = targets("all-linear")
    assert len(all_linear) == 2 * 7 and not any("lm_head" in t for t in all_linear)


def test_target_that_matches_nothing_lists_the_linear_layers():
    with pytest.raises(lorakit.TargetError) as info:
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["qproj"]))
    message = str(info.value)
    assert "matched no Linear layer" in message and "q_proj" in message and "down_proj" in message


def test_unsupported_layer_kind_is_refused():
    with pytest.raises(lorakit.TargetError, match="embed_tokens \\(Embedding\\)"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["embed_tokens"]))


def test_injecting_twice_under_one_name_is_an_error():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="already injected"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["v_proj"]))


def test_several_adapters_side_by_side_and_active_set():
    base = tiny_llama()
    reference = model_output(base, INPUT)
    model = lorakit.inject(base, lorakit.LoraConfig(target_modules=["q_proj", "v_proj"]), "first")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]), "second")
    randomise_adapters(model)
    assert lorakit.active_adapters(model) == ["first"]
    only_first = model_output(model, INPUT)
    lorakit.set_active(model, "second")
    only_second = model_output(model, INPUT)
    lorakit.set_active(model, ["first", "second"])
    both = model_output(model, INPUT)
    assert not torch.allclose(only_first, only_second)
    # The adapters touch different layers in the same forward, so compare against merging both.
    lorakit.merge(model)
    assert (model_output(model, INPUT) - both).abs().max() <= 1e-5
    lorakit.unmerge(model)
    with lorakit.disabled(model):
        assert (model_output(model, INPUT) - reference).abs().max() <= 1e-6
    assert (model_output(model, INPUT) - both).abs().max() <= 1e-5
    with pytest.raises(lorakit.ConfigError, match="no adapter named"):
        lorakit.set_active(model, "third")


def test_disabled_takes_merged_adapters_out_and_puts_them_back():
    base = tiny_llama()
    reference = model_output(base, INPUT)
    model = lorakit.inject(base, lorakit.LoraConfig(target_modules="all-linear"))
    randomise_adapters(model)
    lorakit.merge(model)
    merged = model_output(model, INPUT)
    with lorakit.disabled(model):
        assert (model_output(model, INPUT) - reference).abs().max() <= 1e-5
    assert (model_output(model, INPUT) - merged).abs().max() <= 1e-6


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_unload_returns_plain_model(init):
    base = tiny_llama()
    reference = model_output(base, INPUT)
    model = lorakit.inject(base, lorakit.LoraConfig(target_modules="all-linear", init=init))
    randomise_adapters(model)
    adapted_out = model_output(model, INPUT)
    plain = lorakit.unload(model)
    assert not any(isinstance(m, lorakit.AdaptedLinear) for m in plain.modules())
    assert (model_output(plain, INPUT) - reference).abs().max() <= 1e-5  # PiSSA's principal part is given back
    merged = lorakit.unload(lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear")))
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    del adapted_out


def test_gpt2_conv1d_layers_adapt_merge_and_round_trip(tmp_path):
    base = tiny_gpt2()
    reference = model_output(base, INPUT)
    model = lorakit.inject(base, lorakit.LoraConfig(target_modules=["c_attn", "c_fc"], use_dora=True))
    assert (model_output(model, INPUT) - reference).abs().max() <= 1e-5
    randomise_adapters(model)
    adapted_out = model_output(model, INPUT)
    lorakit.save_adapter(model, tmp_path)
    lorakit.merge(model)
    assert (model_output(model, INPUT) - adapted_out).abs().max() <= 1e-5
    reloaded = lorakit.load_adapter(tiny_gpt2(), tmp_path)
    assert (model_output(reloaded, INPUT) - adapted_out).abs().max() <= 1e-5


def test_bert_all_linear_round_trip(tmp_path):
    model = lorakit.inject(tiny_bert(), lorakit.LoraConfig(target_modules="all-linear", use_rslora=True))
    randomise_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "query" in saved["target_modules"]
    reloaded = lorakit.load_adapter(tiny_bert(), tmp_path)
    assert (model_output(reloaded, INPUT) - model_output(model, INPUT)).abs().max() <= 1e-5


def test_freeze_a_trains_only_b():
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], freeze_a=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("lora_B.weight") for n in names)


def test_save_writes_peft_keys_and_no_temp_files(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    lorakit.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys


@pytest.fixture
def saved_adapter(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def assert_model_untouched(model):
    assert not any(isinstance(m, lorakit.AdaptedLinear) for m in model.modules())
    assert lorakit.adapter_configs(model) == {}


def test_pickle_adapter_is_refused(saved_adapter):
    (saved_adapter / "adapter_model.safetensors").rename(saved_adapter / "adapter_model.bin")
    with pytest.raises(lorakit.AdapterFileError, match="never unpickles"):
        lorakit.load_adapter(tiny_llama(), saved_adapter)


def test_corrupt_file_is_refused_and_model_untouched(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match="corrupt"):
        lorakit.load_adapter(model, saved_adapter)
    assert_model_untouched(model)


def test_missing_and_unexpected_keys_are_named(saved_adapter):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors.pop(missing_key)
    tensors["base_model.model.model.layers.9.self_attn.v_proj.lora_B.weight"] = torch.zeros(16, 4)
    save_file(tensors, path)
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError) as info:
        lorakit.load_adapter(model, saved_adapter)
    assert missing_key in str(info.value) and "layers.9" in str(info.value)
    assert_model_untouched(model)


def test_shape_mismatch_is_named(saved_adapter):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config["r"] = 8
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match=r"shape mismatch.*file \(4, 32\) vs model \(8, 32\)"):
        lorakit.load_adapter(model, saved_adapter)
    assert_model_untouched(model)


def test_missing_folder_and_bad_json(tmp_path):
    with pytest.raises(lorakit.AdapterFileError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(lorakit.AdapterFileError, match="not valid JSON"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_named_adapter_in_peft_subfolder_layout(tmp_path):
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]), "mine")
    randomise_adapters(model)
    lorakit.save_adapter(model, tmp_path / "mine", name="mine")
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path, name="mine")
    assert lorakit.active_adapters(reloaded) == ["mine"]
    assert (model_output(reloaded, INPUT) - model_output(model, INPUT)).abs().max() <= 1e-6


def test_pissa_merge_into_rewritten_base_and_save_against_untouched_base(tmp_path):
    base = tiny_llama()
    model = lorakit.inject(base, lorakit.LoraConfig(r=4, target_modules="all-linear", init="pissa", pissa_niter_k=2))
    randomise_adapters(model)
    adapted_out = model_output(model, INPUT)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32 and config["init_lora_weights"] is True
    lorakit.merge(model)
    assert (model_output(model, INPUT) - adapted_out).abs().max() <= 1e-5
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert (model_output(reloaded, INPUT) - adapted_out).abs().max() <= 1e-5


def test_saved_config_has_only_keys_peft_knows_and_extras_survive(tmp_path):
    import dataclasses

    import peft

    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], freeze_a=True))
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path, trainable=True)
    assert lorakit.adapter_configs(reloaded)["default"].freeze_a
    names = [n for n, p in reloaded.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("lora_B.weight") for n in names)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_rank_above_layer_size_is_refused_for_weight_inits(init):
    model = tiny_llama()
    reference = model_output(model, INPUT)
    with pytest.raises(lorakit.ConfigError, match="r <= min\\(in, out\\) = 16"):
        # q_proj (32 x 32) is rewritten before k_proj (16 x 32) fails: the failure must undo it.
        lorakit.inject(model, lorakit.LoraConfig(r=20, target_modules=["q_proj", "k_proj"], init=init))
    assert_model_untouched(model)
    assert all(p.requires_grad for p in model.parameters())
    assert (model_output(model, INPUT) - reference).abs().max() <= 1e-5


def test_rank_and_alpha_patterns_round_trip_through_peft(tmp_path):
    import peft

    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa",
                                rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    model = lorakit.inject(tiny_llama(), config)
    scalings = {path: layer.adapters["default"].scaling for path, layer in adapted_layers(model)}
    assert scalings["model.layers.0.self_attn.v_proj"] == 8 / 2 and scalings["model.layers.1.self_attn.q_proj"] == 3 / 4
    randomise_adapters(model)
    lorakit.save_adapter(model, tmp_path)  # PiSSA: written as rank 2r, patterns doubled with it
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (model_output(theirs, INPUT) - model_output(model, INPUT)).abs().max() <= 1e-5


def test_bad_values_fail_at_construction_too():
    with pytest.raises(lorakit.ConfigError, match="r=0"):
        lorakit.LoraConfig(r=0)
    config = lorakit.LoraConfig()
    config.alpha = -1  # changed after construction: inject checks again
    with pytest.raises(lorakit.ConfigError, match="alpha=-1"):
        lorakit.inject(tiny_llama(), config)


def test_data_initialiser_gets_the_batches_its_options_and_runs_inside_inject():
    from dataclasses import dataclass

    from lorakit.core import registry

    @dataclass
    class Options:
        batches: int = 1

    seen = {}

    def fake_init(model, adapter_name, data, options, progress):
        batches = [batch for _, batch in zip(range(options.batches), data)]
        seen.update(adapter=adapter_name, batches=len(batches), progress=progress)
        for _, layer in lorakit.core.adapted_layers(model):
            with torch.no_grad():
                layer.adapters[adapter_name].lora_B.weight.fill_(0.5)

    registry.register_data_initialiser("test-data-init", Options)(fake_init)
    original = lorakit.methods.lora.LORA_INITS
    lorakit.methods.lora.LORA_INITS = original + ("test-data-init",)
    try:
        config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init="test-data-init", init_options={"batches": 2})
        with pytest.raises(lorakit.ConfigError, match="estimates the adapter from data"):
            lorakit.inject(tiny_llama(), config)
        with pytest.raises(lorakit.ConfigError, match="has no field"):
            lorakit.LoraConfig(init="test-data-init", init_options={"rank": 3})
        batches = ({"input_ids": torch.zeros(1, 3, dtype=torch.long)} for _ in range(10))
        model = lorakit.inject(tiny_llama(), config, data=batches, progress=False)
        assert seen == {"adapter": "default", "batches": 2, "progress": False}
        assert all((layer.adapters["default"].lora_B.weight == 0.5).all() for _, layer in lorakit.core.adapted_layers(model))
    finally:
        lorakit.methods.lora.LORA_INITS = original
        registry._DATA_INITIALISERS.pop("test-data-init")
    with pytest.raises(lorakit.ConfigError, match="does not use data"):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), data=[{}])
    with pytest.raises(lorakit.ConfigError, match="takes no options"):
        lorakit.LoraConfig(init_options={"x": 1})


def test_public_functions_are_not_shadowed_by_the_tool_packages_of_the_same_name():
    import sys

    assert lorakit.merge is sys.modules["lorakit.core.inject"].merge  # not the lorakit/merge/ package
    assert callable(lorakit.prune) and callable(lorakit.merge_adapters) and callable(lorakit.quantize)
    assert all(hasattr(lorakit, name) for name in lorakit.__all__)
