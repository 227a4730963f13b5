"""`lorakit train` end to end on a tiny model: run folder, PEFT-loadable adapter, resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli.main import main as cli_main
from lorakit.train import TrainConfig, train

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Repeat the word: w{i}", "response": f"w{i}"} for i in range(60)]
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_config(model: Path, data: Path, output_dir: Path, **overrides) -> TrainConfig:
    fields = dict(model=str(model), data=str(data), output_dir=str(output_dir), max_steps=6, batch_size=4,
                  save_steps=2, logging_steps=1, eval_examples=8, max_new_tokens=4, eval_fraction=0.2,
                  learning_rate=1e-2, adapter={"r": 4, "alpha": 8, "dropout": 0.1})
    fields.update(overrides)
    return TrainConfig.from_dict(fields)


def test_train_writes_a_complete_run_folder(tmp_path, tiny_model_folder, tiny_data):
    metrics = train(tiny_config(tiny_model_folder, tiny_data, tmp_path / "run"), progress=False)
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.json",
                 "config.yaml", "loss_curve.png", "metrics_before.json"):
        assert (run / name).exists(), name
    assert metrics["train"]["steps"] == 6
    assert set(metrics["before"]) >= {"loss", "exact_match"} and metrics["after"]["loss"] < metrics["before"]["loss"]
    # The run's adapter is a PEFT adapter.
    base = LlamaForCausalLM.from_pretrained(tiny_model_folder)
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter")
    ours = lorakit.load_adapter(LlamaForCausalLM.from_pretrained(tiny_model_folder), run / "adapter")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= 1e-5


KILLING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {src!r})
    from lorakit.train import runner
    from lorakit.train.config import TrainConfig
    import yaml

    class KilledAfterCheckpoint(runner.AdapterTrainer):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    runner.AdapterTrainer = KilledAfterCheckpoint
    config = TrainConfig.from_yaml({config!r})
    runner.train(config, progress=False)
    """
)


def test_resume_after_sigkill_reaches_the_same_adapter(tmp_path, tiny_model_folder, tiny_data):
    straight = tiny_config(tiny_model_folder, tiny_data, tmp_path / "straight")
    train(straight, progress=False)

    interrupted = tiny_config(tiny_model_folder, tiny_data, tmp_path / "interrupted")
    (tmp_path / "interrupted").mkdir()
    config_file = tmp_path / "interrupted.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(interrupted.to_dict()))
    script = KILLING_RUN.format(src=str(SRC), config=str(config_file))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "interrupted" / "checkpoints" / "checkpoint-4").exists()
    assert not (tmp_path / "interrupted" / "adapter").exists()

    assert cli_main(["train", "--resume", str(tmp_path / "interrupted"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-4")
    resumed = load_file(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key


def test_cli_rejects_bad_values_with_a_named_field(capsys):
    assert cli_main(["train", "--r", "0", "--quiet"]) == 2
    assert "r=0" in capsys.readouterr().err


def test_missing_data_field_names_fields_found(tmp_path, tiny_model_folder):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question_text": "hi", "gold": "x"}) + "\n")
    with pytest.raises(ValueError, match="question_text"):
        train(tiny_config(tiny_model_folder, data, tmp_path / "run"), progress=False)


def test_default_settings_are_the_ones_measured_on_the_default_task():
    from lorakit.data.default_task import RECOMMENDED

    config = TrainConfig()
    assert (config.max_steps, config.batch_size, config.learning_rate, config.warmup_steps, config.max_new_tokens) == (
        RECOMMENDED["steps"], RECOMMENDED["batch_size"], RECOMMENDED["lr"], RECOMMENDED["warmup_steps"],
        RECOMMENDED["max_new_tokens"])
    assert config.max_length >= RECOMMENDED["max_length"]


def test_a_data_folder_with_a_test_file_uses_it_as_the_held_out_split(tmp_path):
    from lorakit.train.runner import prepare_examples

    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "answer": "a"}) for i in range(20)))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps({"question": f"t{i}", "answer": "b"}) for i in range(5))
                                         + "\n" + json.dumps({"question": "q3", "answer": "a"}))
    train_examples, held_out = prepare_examples(TrainConfig(data=str(tmp_path)))
    assert len(train_examples) == 20
    assert [e.response for e in held_out] == ["b"] * 5  # q3 also occurs in training, so it is dropped


def test_cli_eval_and_generate_use_a_trained_adapter(tmp_path, tiny_model_folder, tiny_data, capsys):
    train(tiny_config(tiny_model_folder, tiny_data, tmp_path / "run", save_steps=0), progress=False)
    adapter = str(tmp_path / "run" / "adapter")
    capsys.readouterr()
    assert cli_main(["eval", "--adapter", adapter, "--model", str(tiny_model_folder), "--data", str(tiny_data),
                     "--examples", "4", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(printed[: printed.index("}") + 1])
    assert scores["examples"] == 4 and 0.0 <= scores["exact_match"] <= 1.0 and scores["loss"] > 0
    assert cli_main(["generate", "--adapter", adapter, "--model", str(tiny_model_folder), "--prompt", "Repeat the word: w3",
                     "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli_main(["generate", "--adapter", str(tmp_path / "missing"), "--model", str(tiny_model_folder),
                     "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_lorakit_runs_the_cli():
    """`python -m lorakit` goes through src/lorakit/__main__.py to the CLI."""
    done = subprocess.run([sys.executable, "-m", "lorakit", "--version"], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0 and "lorakit" in done.stdout


def test_resume_without_a_run_folder_is_an_error(capsys):
    assert cli_main(["train", "--resume", "--quiet"]) == 2
    assert "--resume RUN_DIR" in capsys.readouterr().err


def test_train_with_another_method_from_the_cli(tmp_path, tiny_model_folder, tiny_data):
    run = tmp_path / "bone-run"
    assert cli_main(["train", "--quiet", "--method", "bone", "--r", "8", "--variant", "bat", "--model", str(tiny_model_folder),
                     "--data", str(tiny_data), "--max-steps", "2", "--save-steps", "0", "--eval-examples", "2",
                     "--max-new-tokens", "2", "--output-dir", str(run)]) == 0
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS" and saved["init_weights"] == "bat" and saved["r"] == 8
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["adapter"]["variant"] == "bat" and resolved["adapter"]["target_modules"] == "all-linear"


def test_unknown_config_fields_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_stepz: 10\nadapter: {r: 4}\n")
    with pytest.raises(lorakit.ConfigError, match="TrainConfig has no field\\(s\\) \\['max_stepz'\\]"):
        TrainConfig.from_yaml(path)
    with pytest.raises(lorakit.ConfigError, match="LoraConfig has no field\\(s\\) \\['rank'\\]"):
        TrainConfig(adapter={"rank": 4}).validate()


def test_response_loss_equals_the_models_own_mean_loss_on_response_tokens(tiny_model_folder):
    from lorakit.data import DataCollator, Example, encode
    from lorakit.train.evaluate import response_loss

    model, tokenizer = lorakit.models.load(str(tiny_model_folder))
    example = Example(messages=[{"role": "user", "content": "Repeat the word: w7"}], response="w7 and more")
    batch = DataCollator.from_tokenizer(tokenizer)([encode(tokenizer, example, 64)])
    with torch.no_grad():
        expected = model(**batch).loss.item()  # HF's mean over the labelled (response) tokens
    assert abs(response_loss(model, tokenizer, [example], max_length=64) - expected) < 1e-5
