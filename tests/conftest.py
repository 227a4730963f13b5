"""Tiny, randomly initialised models of real architectures, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test models are tiny: a second thread only adds start-up and contention (several-fold slower
    on a busy 2-core machine). LORAKIT_TEST_THREADS overrides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2Model(config).eval()


MODEL_BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def model_output(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with the default model's real tokenizer, saved as an HF folder."""
    import lorakit.models

    _, tokenizer = lorakit.models.load(lorakit.models.DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def logits_in_fresh_process(adapter_dir: Path, input_ids: torch.Tensor, work_dir: Path) -> torch.Tensor:
    """Logits of `tiny_llama()` with the adapter in `adapter_dir` loaded by a new Python process
    (same torch thread count, so reductions run in the same order): proves a saved adapter needs
    nothing from the process that wrote it (random bases regenerated from the file's seed, say)."""
    import subprocess
    import sys

    tests, src = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "src"
    torch.save(input_ids, work_dir / "ids.pt")
    script = f"""
import sys, torch
sys.path[:0] = [{str(src)!r}, {str(tests)!r}]
torch.set_num_threads({torch.get_num_threads()})
import lorakit
from conftest import tiny_llama
ids = torch.load({str(work_dir / 'ids.pt')!r}, weights_only=True)
model = lorakit.load_adapter(tiny_llama(), {str(adapter_dir)!r})
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, {str(work_dir / 'fresh_logits.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(work_dir / "fresh_logits.pt", weights_only=True)


def train_cli_with_rank_policy(run: Path, model_folder: Path, policy: str, steps: int, *flags: str) -> int:
    """`lorakit train` on 40 tiny "Repeat: wN" examples with q/v targets and a rank policy (the CLI
    path every rank policy's test runs)."""
    import json

    from lorakit.cli.main import main as cli_main

    run.mkdir(parents=True, exist_ok=True)
    rows = run / "train.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"Repeat: w{i}", "response": f"w{i}"}) for i in range(40)) + "\n")
    return cli_main(["train", "--model", str(model_folder), "--data", str(rows), "--output-dir", str(run),
                     "--max-steps", str(steps), "--batch-size", "4", "--save-steps", "0", "--eval-examples", "4",
                     "--max-new-tokens", "2", "--rank-policy", policy, "--target-modules", "q_proj,v_proj", *flags])
