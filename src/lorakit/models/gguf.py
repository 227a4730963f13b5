"""Convert a GGUF checkpoint into a plain Hugging Face folder, once, and cache it.

Transformers can read a ``.gguf`` file directly, but doing so de-quantizes every tensor
(about 16 s for the 135M default model on two CPU cores) and leaves a model that refuses
``save_pretrained`` because it still carries the GGUF "quantizer". lorakit therefore converts
each GGUF file exactly once into an ordinary float32 safetensors folder plus tokenizer files,
and every later load reads that folder in well under a second.

Cache layout (``cache_dir()`` is ``$XDG_CACHE_HOME/lorakit``, default ``~/.cache/lorakit``)::

    <cache_dir>/models/smollm2-135m-instruct/      the embedded default model
    <cache_dir>/models/gguf-<stem>-<key>/          any other .gguf, keyed by path+size+mtime

Each converted folder also holds ``lorakit-conversion.json`` recording the source file and the
``name_or_path`` to report for the model, so adapters saved on it name their real base.

A conversion is written into a temporary sibling folder and renamed into place in one
``os.rename``; a conversion killed half-way therefore never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONVERSION_RECORD = "lorakit-conversion.json"
"""File written inside every converted folder: source GGUF and the name to report."""

# Temporary folders older than this are leftovers of killed conversions and may be removed.
# A live conversion takes well under a minute, so a day leaves a very wide safety margin.
_STALE_TEMP_SECONDS = 24 * 3600
_TEMP_PREFIX = ".converting-"


def cache_dir() -> Path:
    """Return lorakit's cache root: ``$XDG_CACHE_HOME/lorakit`` (default ``~/.cache/lorakit``).

    The folder is not created here; writers create what they need.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorakit"


def models_cache_dir() -> Path:
    """Return the folder that holds converted models: ``cache_dir() / "models"``."""
    return cache_dir() / "models"


def gguf_cache_key(gguf_path: Path) -> str:
    """Return a folder name identifying one GGUF file by path, size and modification time.

    Hashing the file content would cost a full read of a possibly multi-GB file on every load;
    size plus nanosecond mtime changes whenever the file is replaced, which is what matters.
    """
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    return f"gguf-{resolved.stem.lower()}-{digest[:16]}"


def read_conversion_record(folder: Path) -> dict:
    """Return the conversion record of a converted folder, or ``{}`` if it has none."""
    record_path = folder / CONVERSION_RECORD
    if not record_path.is_file():
        return {}
    return json.loads(record_path.read_text())


def ensure_converted(gguf_path: Path, target: Path, name_or_path: str) -> Path:
    """Return ``target``, first converting ``gguf_path`` into it if it does not exist yet.

    Args:
        gguf_path: the ``.gguf`` file to convert.
        target: the final folder; it appears atomically once the conversion is complete.
        name_or_path: the model name to record (for example the Hub id the GGUF was made from).
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(target.parent)

    temp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{target.name}-", dir=target.parent))
    # mkdtemp makes the folder private (0700); the finished cache should read like any folder.
    temp.chmod(0o755)
    try:
        logger.info("Converting %s to a plain Hugging Face folder (one-time, ~20 s)", gguf_path)
        _convert(gguf_path, temp, name_or_path)
        try:
            os.rename(temp, target)
        except OSError:
            # Another process finished the same conversion first; its result is equally good.
            if not (target / "config.json").is_file():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_folder: Path, name_or_path: str) -> None:
    """De-quantize ``gguf_path`` to float32 and save model + tokenizer into ``out_folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # The weights are already de-quantized to float32; the GGUF quantizer left on the model only
    # blocks save_pretrained ("model is quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name_or_path
    model.save_pretrained(out_folder)
    tokenizer.save_pretrained(out_folder)
    stat = gguf_path.stat()
    record = {
        "source": str(gguf_path.resolve()),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "name_or_path": name_or_path,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _remove_stale_temp_folders(parent: Path) -> None:
    """Delete temporary folders left by conversions that were killed long ago."""
    now = time.time()
    for entry in parent.glob(f"{_TEMP_PREFIX}*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # vanished meanwhile, or not ours to remove: either way nothing to do
