"""bf16 where the hardware has it: detection, the mixed-precision recipe, and the fused head + loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import lorakit
from lorakit.core import precision
from lorakit.core.errors import ConfigError
from lorakit.train.loss import causal_lm_loss, fused_loss_supported
from conftest import tiny_llama
from lorakit.cli.main import main as cli_main
from lorakit.core.inject import adapter_parameters
from lorakit.train import TrainConfig


@pytest.fixture
def fresh_support():
    precision.bf16_support.cache_clear()
    yield
    precision.bf16_support.cache_clear()


@pytest.mark.parametrize("flags, fast", [({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True),
                                         ({"amx_tile", "amx_bf16"}, True)])
def test_cpu_bf16_is_fast_exactly_when_the_cpu_has_bf16_dot_products(monkeypatch, fresh_support, flags, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "_torch_cpu_check", lambda name: False)
    support = precision.bf16_support("cpu")
    assert support.fast is (fast and torch.backends.mkldnn.is_available())
    found = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    assert support.evidence.startswith("CPU flags: " + (", ".join(found) if found else "neither"))
    assert precision.resolve_dtype("auto", "cpu") == (torch.bfloat16 if support.fast else torch.float32)


def test_explicit_dtypes_are_kept_and_slow_bf16_warns(monkeypatch, fresh_support):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(precision, "_torch_cpu_check", lambda name: False)
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    with pytest.warns(precision.SlowDtypeWarning, match="emulated"):
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_an_unknown_dtype_is_an_error_naming_the_choices():
    with pytest.raises(ConfigError, match="auto, float32, bfloat16"):
        precision.resolve_dtype("fp16", "cpu")
    with pytest.raises(ConfigError, match="dtype='half'"):
        TrainConfig(dtype="half").validate()


def _batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_bf16_recipe_keeps_adapter_grads_and_optimizer_state_in_float32():
    reference = tiny_llama()
    model = precision.prepare_model(tiny_llama(), torch.bfloat16)
    for m in (reference, model):
        torch.manual_seed(0)
        lorakit.inject(m, lorakit.LoraConfig(r=4, target_modules="all-linear"))
        m.train()
    batch = _batch()
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    with precision.autocast(torch.bfloat16, "cpu", seq_len=12):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    assert loss.dtype == torch.float32
    assert {p.grad.dtype for p in trainable} == {torch.float32}
    assert {v.dtype for state in optimizer.state.values() for v in state.values() if v.dim()} == {torch.float32}
    expected = reference(**batch).loss
    assert abs(loss.item() - expected.item()) <= 0.02 * expected.item()  # bf16 rounding, not a different loss


def test_rank_r_intermediate_runs_in_bf16_under_autocast_and_in_float32_without():
    model = precision.prepare_model(tiny_llama(), torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    seen = []
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    adapter.lora_A.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    ids = torch.tensor([[1, 2, 3, 4]])
    with precision.autocast(torch.bfloat16, "cpu"):
        model(input_ids=ids)
    model(input_ids=ids)
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


def test_fused_loss_equals_transformers_loss_and_its_gradients():
    model = tiny_llama().double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.normal_(0, 0.1)
    batch = _batch()
    for items in (None, 25):
        expected = model(**batch, **({} if items is None else {"num_items_in_batch": items})).loss
        expected.backward()
        reference = [p.grad.clone() for p in adapter_parameters(model).values()]
        model.zero_grad()
        loss = causal_lm_loss(model, batch, items, chunk=5)  # several chunks, the last one short
        loss.backward()
        assert loss.dtype == torch.float32
        assert abs(loss.item() - expected.item()) <= 1e-5
        for got, want in zip((p.grad for p in adapter_parameters(model).values()), reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        model.zero_grad()


def test_fused_loss_is_not_used_where_it_would_differ():
    plain = tiny_llama()
    lorakit.inject(plain, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    assert fused_loss_supported(plain)
    with_head = tiny_llama()
    lorakit.inject(with_head, lorakit.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert not fused_loss_supported(with_head)  # the head carries an adapter
    trained_head = tiny_llama()
    assert not fused_loss_supported(trained_head)  # a plain model trains its head
    capped = tiny_llama()
    capped.requires_grad_(False)
    capped.config.model_type, capped.config.final_logit_softcapping = "gemma2", 30.0
    assert not fused_loss_supported(capped)


def test_a_training_run_flushes_subnormals_and_gives_the_callers_setting_back():
    torch.set_flush_denormal(False)
    assert not precision.flushing_denormals()
    with precision.denormals_flushed("cpu"):
        if torch.set_flush_denormal(True):  # False where the CPU cannot flush (then nothing is promised)
            assert precision.flushing_denormals()
    assert not precision.flushing_denormals()  # user code after train() computes as before


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_train_in_each_dtype_saves_a_float32_adapter_that_peft_loads(tmp_path, tiny_model_folder, dtype):
    import peft

    rows = tmp_path / "train.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Repeat: w{i}", "response": f"w{i}"}) for i in range(40)) + "\n")
    run = tmp_path / "run"
    assert cli_main(["train", "--quiet", "--model", str(tiny_model_folder), "--data", str(rows),
                                  "--output-dir", str(run), "--max-steps", "4", "--batch-size", "4", "--save-steps", "0",
                                  "--eval-examples", "4", "--max-new-tokens", "2", "--learning-rate", "0.01",
                                  "--dtype", dtype]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["dtype"] == dtype
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    ours = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5


def test_eval_and_generate_take_a_dtype_and_agree_with_float32_on_a_tiny_model(tmp_path, tiny_model_folder, capsys):
    rows = tmp_path / "eval.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Repeat: w{i}", "response": f"w{i}"}) for i in range(6)) + "\n")
    losses = {}
    for dtype in ("float32", "bfloat16"):
        assert cli_main(["eval", "--model", str(tiny_model_folder), "--data", str(rows), "--max-new-tokens", "2",
                         "--dtype", dtype]) == 0
        out = capsys.readouterr().out
        losses[dtype] = json.loads(out[out.index("{"):out.index("}") + 1])["loss"]
        assert cli_main(["generate", "--model", str(tiny_model_folder), "--prompt", "Repeat: w1", "--max-new-tokens", "2",
                         "--dtype", dtype]) == 0
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.02 * losses["float32"]
    with pytest.raises(SystemExit):  # argparse names the choices
        cli_main(["eval", "--model", str(tiny_model_folder), "--dtype", "fp16"])


def test_auto_trains_a_model_passed_in_in_its_own_dtype_and_bfloat16_converts_it(tmp_path, tiny_model_folder):
    from lorakit.train import train

    rows = tmp_path / "train.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Repeat: w{i}", "response": f"w{i}"}) for i in range(40)) + "\n")
    for dtype, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        model, tokenizer = lorakit.models.load(str(tiny_model_folder))
        config = TrainConfig.from_dict(dict(model=str(tiny_model_folder), data=str(rows), output_dir=str(tmp_path / dtype),
                                            max_steps=1, batch_size=4, save_steps=0, eval_examples=2, max_new_tokens=1,
                                            adapter={"r": 4, "alpha": 8}, dtype=dtype))
        metrics = train(config, progress=False, model=model, tokenizer=tokenizer)
        assert metrics["train"]["dtype"] == precision.dtype_name(expected)
        assert model.model.embed_tokens.weight.dtype == expected
