"""Adapter files: PEFT's on-disk format for methods PEFT has, the same layout for the rest.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
``base_model.model.<module path>.<adapter tensor suffix>`` (PEFT's keys with the adapter name
removed). Writes are atomic (temporary file, then rename); loading never unpickles and never
leaves a partly loaded adapter behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.core.config import AdapterConfig
from lorakit.core.errors import (
    AdapterConfigError,
    AdapterFileError,
    ConfigError,
    DtypeConversionWarning,
    LorakitError,
    TargetError,
)
from lorakit.core.inject import adapted_layers, adapter_configs, inject, requires_grad_flags, undo_inject
from lorakit.core.registry import method_for_peft_type, method_spec, weight_initialiser

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
EXTRAS_KEY = "lorakit"  # lorakit-only fields (method, freeze_a, original init), never needed by PEFT
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


TEMP_MARK = ".lorakit-tmp-"  # in the name of every temporary file or folder lorakit writes (a dot-name: hidden)
# A temporary file or folder whose newest write is this old belongs to a killed or hung writer: a
# live write touches its file far more often (a folder: whenever a file is added or written).
STALE_TEMP_AGE_S = 15 * 60


def temp_path_for(target: Path, tag: str = "") -> Path:
    """A fresh hidden path next to `target` for writing it; `remove_stale_temps` recognises it."""
    return target.parent / f".{target.name}{TEMP_MARK}{tag + '-' if tag else ''}{uuid.uuid4().hex[:12]}"


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _newest_write(path: Path) -> float:
    """The latest mtime of `path` and, for a folder, of anything directly inside it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for entry in os.scandir(path):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def remove_stale_temps(folder: Path, max_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete what killed writers left in `folder`: lorakit's temporary files and staging folders
    (names holding TEMP_MARK) untouched for `max_age_s` seconds. Anything else, and a write still in
    progress, is never touched; readers never look at these names. Returns what was removed."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _is_temp_name(entry.name):
            continue
        path = Path(entry.path)
        try:
            if now - _newest_write(path) < max_age_s:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another process cleaned it first, or it is not ours to delete
            continue
        removed.append(path)
    return removed


def _create_temp_file(target: Path) -> tuple[int, Path]:
    """A new, exclusively created temporary file next to `target`, open for writing. Created with
    mode 0o666 so the kernel applies the user's umask (and a folder's default ACL), as for any
    file the user writes (mkstemp would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = temp_path_for(target)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 48 random bits collided: draw again
            continue


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a crash after it must not bring the old file back)."""
    with contextlib.suppress(OSError):  # not every platform or file system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prepare_folder(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never part of one, and a
    crash leaves no partial file (a kill can leave a hidden temporary, removed by a later write)."""
    path = Path(path)
    _prepare_folder(path)
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def make_staging_folder(out: Path, tag: str) -> Path:
    """A new hidden folder next to `out` to assemble it in (permissions from the umask, as any
    folder the user creates); `remove_stale_temps` cleans it up if its writer is killed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    stage = temp_path_for(out, tag)
    stage.mkdir()
    return stage


@contextlib.contextmanager
def staged_folder(out: Path, tag: str, files: Sequence[str]) -> Iterator[Path]:
    """A staging folder next to `out` to write `files` into. When the block succeeds they are moved
    into place: one folder rename when `out` is new or empty, else file by file in the order given
    (put the file readers look for first, the config, last). The staging folder is removed either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file; pass a folder")
    stage = make_staging_folder(out, tag)
    try:
        yield stage
        if not out.exists() or not any(out.iterdir()):
            if out.exists():
                out.rmdir()
            os.replace(stage, out)
        else:
            for name in files:
                os.replace(stage / name, out / name)
        fsync_folder(out.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`save_file` made atomic and durable, with the permissions the umask gives (see `atomic_write_bytes`)."""
    path = Path(path)
    _prepare_folder(path)
    fd, tmp = _create_temp_file(path)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask made of 0o666
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # save_file writes a new file of its own, mode 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # save_file does not: without it a crash after the rename can leave an empty file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _task_type(model: nn.Module) -> str | None:
    names = [cls.__name__ for cls in type(model).__mro__]
    if any(n.endswith("ForCausalLM") for n in names):
        return "CAUSAL_LM"
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "SEQ_CLS"
    return None


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def adapter_state(model: nn.Module, name: str, for_untouched_base: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` keyed as in the file."""
    tensors = {}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            try:
                own = adapter.file_tensors(for_untouched_base=for_untouched_base)
            except TypeError:
                own = adapter.file_tensors()
            for suffix, tensor in own.items():
                tensors[f"{KEY_PREFIX}{path}.{suffix}"] = tensor
    return tensors


def config_file_dict(model: nn.Module, name: str, for_untouched_base: bool = True) -> dict[str, Any]:
    config = adapter_configs(model)[name]
    targets = [path for path, layer in adapted_layers(model) if name in layer.adapters]
    if hasattr(config, "to_file_dict"):
        data = config.to_file_dict(targets, for_untouched_base=for_untouched_base)
    else:
        data = {"peft_type": None, "lorakit": {"method": config.method}, **config.to_dict()}
    data["task_type"] = _task_type(model)
    data["base_model_name_or_path"] = _base_model_name(model)
    data.setdefault("inference_mode", True)
    return data


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", for_untouched_base: bool = True) -> Path:
    """Write adapter `name` to `directory` (PEFT's layout; created if needed).

    Adapters whose initialiser rewrote W (PiSSA, OLoRA) are written, by default, as an update
    that is exact against the untouched base model (`for_untouched_base=True`); pass False to
    write the raw factors (what a training checkpoint needs, re-applied on load by re-running
    the initialiser, as PEFT does).
    """
    configs = adapter_configs(model)
    if name not in configs:
        raise ConfigError(f"no adapter named {name!r} to save; the model has: {sorted(configs) or 'none'}")
    directory = Path(directory)
    tensors = adapter_state(model, name, for_untouched_base)
    config = config_file_dict(model, name, for_untouched_base)
    metadata = {"format": "pt"}
    if config.get("peft_type"):
        # PEFT warns about unknown config keys; our extras travel in the tensor file's metadata.
        metadata[EXTRAS_KEY] = json.dumps(config.pop(EXTRAS_KEY, {}), sort_keys=True)
    atomic_save_safetensors(directory / WEIGHTS_NAME, tensors, metadata=metadata)
    atomic_write_json(directory / CONFIG_NAME, config)
    return directory


MAX_CONFIG_BYTES = 16 * 2**20  # PEFT configs are a few KB; a 100k-module rank_pattern is still far below
MAX_FILE_RANK = 2**16  # a rank read from a file beyond this is an error, not a request to allocate it

# PEFT's adapter_config.json fields that lorakit reads, with the kind of value each must hold and
# whether null is allowed; checked before any method converts them, so a bad value fails naming its
# field. Fields of lorakit's own formats (peft_type null) are checked by each config's field types.
_PEFT_FIELDS: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(("peft_type", "task_type", "base_model_name_or_path", "bias", "revision"), ("string", True)),
    "lorakit": ("object", True),
    "target_modules": ("module names", False),
    **dict.fromkeys(("r", "init_r", "target_r", "mini_r"), ("rank", False)),
    **dict.fromkeys(("tinit", "tfinal", "deltaT", "projection_prng_key", "decompose_factor"), ("integer", False)),
    "total_step": ("integer", True),
    **dict.fromkeys(("lora_alpha", "alpha", "randlora_alpha", "d_initial", "beta1", "beta2", "orth_reg_weight"),
                    ("number", False)),
    **dict.fromkeys(("lora_dropout", "vera_dropout", "miss_dropout", "randlora_dropout", "rank_dropout",
                     "module_dropout"), ("number", True)),
    **dict.fromkeys(("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "decompose_both",
                     "rank_dropout_scale", "save_projection", "sparse", "very_sparse", "use_qalora", "lora_bias"),
                    ("boolean", True)),
    **dict.fromkeys(("init_lora_weights", "init_weights"), ("boolean or string", False)),
    "rank_pattern": ("rank pattern", True),
    "alpha_pattern": ("alpha pattern", True),
}
_EXTRAS_FIELDS: dict[str, tuple[str, bool]] = {
    **dict.fromkeys(("method", "init", "basis_generator", "scaling"), ("string", True)),
    **dict.fromkeys(("freeze_a", "converted_to_untouched_base"), ("boolean", True)),
}
_KIND_TEXT = {
    "string": "a string",
    "boolean": "true or false",
    "boolean or string": "true, false or a string",
    "integer": "an integer",
    "number": "a finite number",
    "rank": f"a positive integer of at most {MAX_FILE_RANK}",
    "module names": "a regex string or a non-empty list of module names",
    "rank pattern": "an object mapping module-name patterns to ranks (AdaLoRA: to lists of booleans)",
    "alpha pattern": "an object mapping module-name patterns to numbers",
    "object": "a JSON object",
}


_JSON_NAMES = {list: "array", type(None): "null", str: "string", int: "number", float: "number", bool: "boolean"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_FILE_RANK


def _fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "boolean or string":
        return isinstance(value, (bool, str))
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return _is_number(value)
    if kind == "rank":
        return _is_rank(value)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "module names":
        return isinstance(value, str) or (
            isinstance(value, list) and bool(value) and all(isinstance(name, str) and name for name in value))
    if kind == "rank pattern":
        return isinstance(value, dict) and all(
            _is_rank(v) or (isinstance(v, list) and all(isinstance(m, bool) for m in v)) for v in value.values())
    if kind == "alpha pattern":
        return isinstance(value, dict) and all(_is_number(v) and v > 0 for v in value.values())
    raise AssertionError(kind)


def _check_fields(data: dict[str, Any], fields: dict[str, tuple[str, bool]], where: str, source: Any) -> None:
    for key, (kind, nullable) in fields.items():
        if key not in data or (nullable and data[key] is None) or _fits(kind, data[key]):
            continue
        text = repr(data[key])
        shown = text if len(text) <= 120 else text[:120] + f"... ({len(text)} characters)"
        raise AdapterConfigError(
            f"{source}: {where}{key}={shown} is invalid: expected {_KIND_TEXT.get(kind, kind)}"
            f"{' or null' if nullable else ''}. Was the file edited by hand or written by another tool?"
        )


def check_config_fields(data: Any, source: Any) -> None:
    """Refuse an adapter_config.json mapping whose known fields hold values of the wrong kind,
    naming the field (PEFT's fields, and lorakit's extras under "lorakit")."""
    if not isinstance(data, dict):
        kind = _JSON_NAMES.get(type(data), type(data).__name__)
        raise AdapterFileError(f"{source} holds a JSON {kind}, not an object; an adapter config is a JSON object "
                               "such as PEFT's save_pretrained writes")
    _check_fields(data, {"peft_type": _PEFT_FIELDS["peft_type"], "lorakit": _PEFT_FIELDS["lorakit"]}, "", source)
    if data.get("peft_type") is not None:
        _check_fields(data, _PEFT_FIELDS, "", source)
    if isinstance(data.get(EXTRAS_KEY), dict):
        _check_fields(data[EXTRAS_KEY], _EXTRAS_FIELDS, f"{EXTRAS_KEY}.", source)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one object (which one counts is ambiguous)")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_config_json(raw: bytes, source: Any) -> dict[str, Any]:
    """The object an adapter_config.json holds: strict UTF-8 JSON, no duplicate keys, no NaN/Infinity,
    an object at the top, every known field of the right kind (else AdapterFileError naming it)."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{source} is {len(raw):,} bytes; an adapter config is at most {MAX_CONFIG_BYTES:,}")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise AdapterFileError(f"{source} is not valid JSON ({reason})") from None
    check_config_fields(data, source)
    return data


def _open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise AdapterFileError(f"{what} {path} cannot be opened ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AdapterFileError(f"{what} {path} is not a regular file (a folder, FIFO or device); an adapter "
                               "folder holds plain files")
    return fd


def _read_regular(path: Path, what: str, limit: int) -> bytes:
    fd = _open_regular(path, what)
    try:
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise AdapterFileError(f"{what} {path} is larger than {limit:,} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _resolve_folder(directory: Path, name: str) -> Path:
    if not directory.exists():
        raise AdapterFileError(f"adapter folder {str(directory)!r} does not exist")
    if (directory / CONFIG_NAME).exists():
        return directory
    if (directory / name / CONFIG_NAME).exists():  # PEFT puts non-default adapters in sub-folders
        return directory / name
    raise AdapterFileError(
        f"{str(directory)!r} holds no {CONFIG_NAME} (nor {name}/{CONFIG_NAME}); "
        "point at the folder that save_adapter or PEFT's save_pretrained wrote"
    )


def read_adapter_file_dict(directory: str | os.PathLike, name: str = "default") -> tuple[Path, dict[str, Any]]:
    """(folder, the adapter_config.json object, lorakit's extras merged in), every known field checked."""
    folder = _resolve_folder(Path(directory), name)
    source = folder / CONFIG_NAME
    data = parse_config_json(_read_regular(source, "adapter config", MAX_CONFIG_BYTES), source)
    if EXTRAS_KEY not in data:
        data[EXTRAS_KEY] = _extras_from_metadata(folder / WEIGHTS_NAME)
        check_config_fields(data, folder / WEIGHTS_NAME)
    return folder, data


def read_adapter_config(directory: str | os.PathLike, name: str = "default") -> tuple[Path, AdapterConfig]:
    folder, data = read_adapter_file_dict(directory, name)
    return folder, adapter_config_from_dict(data, folder / CONFIG_NAME)


def adapter_config_from_dict(data: dict[str, Any], source: str | os.PathLike) -> AdapterConfig:
    """The config an adapter_config.json holds (lorakit's extras already merged in); `source` names
    the file in error messages (the adapter store reads files itself and names them relatively).
    Every problem with the content is an AdapterFileError naming `source` and, where known, the field."""
    check_config_fields(data, source)
    peft_type = data.get("peft_type")
    method = (data.get(EXTRAS_KEY) or {}).get("method")
    try:
        spec = method_spec(method) if method else (method_for_peft_type(peft_type) if peft_type else None)
        if spec is None:
            raise AdapterFileError(
                f"{source} has peft_type={peft_type!r}, which lorakit cannot load yet"
            )
        if hasattr(spec.config_cls, "from_file_dict"):
            return spec.config_cls.from_file_dict(data)
        fields = {k: v for k, v in data.items() if k not in ("peft_type", EXTRAS_KEY, "task_type", "base_model_name_or_path", "inference_mode")}
        return spec.config_cls.from_dict(fields)
    except AdapterFileError:
        raise
    except LorakitError as err:  # a ConfigError names the field; say which file it came from
        raise AdapterConfigError(f"{source}: {err}") from err
    except KeyError as err:
        raise AdapterConfigError(f"{source} lacks the field {err.args[0]!r}, which a {method or peft_type} adapter "
                               "needs") from err
    except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as err:
        raise AdapterConfigError(f"{source} holds a value lorakit cannot use ({type(err).__name__}: {err})") from err


def _extras_from_metadata(weights: Path) -> dict[str, Any]:
    try:
        os.close(_open_regular(weights, "adapter weights"))  # safe_open would block on a FIFO
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (AdapterFileError, SafetensorError, OSError, ValueError):
        return {}  # a missing or corrupt tensor file is reported when the tensors are read
    return extras_from_metadata(metadata)


def extras_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """lorakit's extras saved in a safetensors file's metadata ({} when absent or unreadable)."""
    text = metadata.get(EXTRAS_KEY)
    try:
        extras = json.loads(text) if text else {}
    except (json.JSONDecodeError, RecursionError):
        return {}
    return extras if isinstance(extras, dict) else {}


def refuse_non_finite(tensors: dict[str, torch.Tensor], source: Any) -> None:
    """AdapterFileError naming the first tensor that holds NaN or inf (such an adapter turns every
    output it touches into NaN)."""
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise AdapterFileError(
                f"{source}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {tensor.numel()}; the "
                "training that wrote it diverged, or the file is corrupt. Pass allow_non_finite=True "
                "(CLI: --allow-non-finite) to load it anyway"
            )


def read_adapter_tensors(folder: Path, allow_non_finite: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s adapter_model.safetensors (never a pickle), refused if any holds NaN or
    inf unless `allow_non_finite`."""
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        pickled = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterFileError(
                f"{folder} holds {pickled[0]}, a pickle file; lorakit never unpickles files (they can run "
                "code). Convert it where you trust it, e.g. in PEFT: "
                "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)"
            )
        raise AdapterFileError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    os.close(_open_regular(weights, "adapter weights"))
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({err}); the file is corrupt or truncated") from None
    if not allow_non_finite:
        refuse_non_finite(tensors, weights)
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtypes(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a non-float tensor where the adapter holds floats; warn once about dtype conversions."""
    conversions: Counter[tuple[torch.dtype, torch.dtype]] = Counter()
    for key, tensor in found.items():
        wanted = expected[key].dtype
        if tensor.dtype == wanted:
            continue
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise AdapterFileError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, but the adapter holds "
                                   f"{wanted} there; adapter weights are floating point")
        conversions[tensor.dtype, wanted] += 1
    if conversions:
        pairs = ", ".join(f"{_dtype_name(a)} -> {_dtype_name(b)} ({n} tensor{'s' * (n > 1)})"
                          for (a, b), n in sorted(conversions.items(), key=str))
        warnings.warn(f"{source}: the file's tensors were converted to the adapter's dtype: {pairs}. The adapter "
                      "computes in its own dtype (float32 on a half-precision base, as PEFT); a file saved in lower "
                      "precision is not made more precise by this", DtypeConversionWarning, stacklevel=3)


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    mismatched = [
        f"{key}: file {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(found))
        if found[key].shape != expected[key].shape
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:3])}")
    if problems:
        raise AdapterFileError(
            f"{source} does not fit this model: {'; '.join(problems)}. Was it trained on another base "
            "model or with other target_modules / r?"
        )


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", trainable: bool = False,
                 allow_non_finite: bool = False) -> nn.Module:
    """Inject the adapter stored in `directory` (ours or PEFT's) under `name` and load its tensors.

    Every config field, key, shape and dtype is checked before anything is copied; on any error
    (an AdapterFileError naming the field or tensor) the model is left exactly as it was. A file
    holding NaN or inf is refused unless `allow_non_finite=True`; tensors stored in another dtype
    than the adapter's are converted with one DtypeConversionWarning. With `trainable=False`
    (default) the adapter's parameters are frozen.
    """
    folder, config = read_adapter_config(directory, name)
    tensors = read_adapter_tensors(folder, allow_non_finite=allow_non_finite)
    # Inject without touching W; a W-rewriting initialiser runs only after the file checked out.
    requires_grad = requires_grad_flags(model)
    try:
        inject(model, config, name, rewrite_weights=False, state_from_file=True)
    except TargetError as err:  # the file's target_modules do not fit this model
        raise AdapterFileError(f"{folder / CONFIG_NAME} does not fit this model: {err}") from err
    try:
        expected = _expected_tensors(model, name, tensors)
        _check_tensors(expected, tensors, folder / WEIGHTS_NAME)
        _check_dtypes(expected, tensors, folder / WEIGHTS_NAME)
    except BaseException:
        undo_inject(model, name, requires_grad)
        raise
    # Files saved with a W-rewriting init (PEFT's default for PiSSA/OLoRA) hold factors relative
    # to W_res: rebuild W_res from this base the way PEFT does, then load the trained factors.
    rewrite = weight_initialiser(getattr(config, "init", None) or "")
    try:
        if rewrite is not None:
            for _, layer in adapted_layers(model):
                if name in layer.adapters:
                    rewrite(layer, name)
        _copy_tensors(model, name, tensors)  # an adapter may still refuse its tensors (LoLDU: another base)
    except BaseException:
        undo_inject(model, name, requires_grad)
        raise
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            for param in layer.adapters[name].parameters():
                param.requires_grad_(trainable and param.requires_grad)
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                         allow_non_finite: bool = False) -> nn.Module:
    """Copy the tensors of a saved adapter into the already injected adapter `name` (a training
    checkpoint into its own run, say). Keys, shapes and dtypes are checked before anything is copied,
    and NaN or inf refused unless `allow_non_finite`, as in `load_adapter`."""
    folder = _resolve_folder(Path(directory), name)
    tensors = read_adapter_tensors(folder, allow_non_finite=allow_non_finite)
    expected = _expected_tensors(model, name, tensors)
    _check_tensors(expected, tensors, folder / WEIGHTS_NAME)
    _check_dtypes(expected, tensors, folder / WEIGHTS_NAME)
    saved = {key: value.clone() for key, value in adapter_state(model, name, for_untouched_base=False).items()}
    try:
        _copy_tensors(model, name, tensors)
    except BaseException:
        _copy_tensors(model, name, saved)  # an adapter refused its tensors part way: put the old ones back
        raise
    return model


def _expected_tensors(model: nn.Module, name: str, found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a file for adapter `name` must hold, plus the optional tensors it does hold (PEFT's saved
    VeRA/RandLoRA projections, shared or per layer), which must then fit too."""
    expected = adapter_state(model, name, for_untouched_base=False)
    optional = dict(_shared_buffers(model, name))
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            for suffix, tensor in layer.adapters[name].optional_file_tensors().items():
                optional[f"{KEY_PREFIX}{path}.{suffix}"] = tensor
    expected.update({key: value for key, value in optional.items() if key in found})
    return expected


def _shared_buffers(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Shared tensors a file may carry for adapter `name` (VeRA's projections), keyed as in the file."""
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            return {key: getattr(adapter, attr) for key, attr in adapter.SHARED_KEYS.items()}
    return {}


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    shared = {key: value for key, value in tensors.items() if key in _shared_buffers(model, name)}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            if shared:
                layer.adapters[name].load_shared_tensors(shared)
            prefix = f"{KEY_PREFIX}{path}."
            own = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            layer.adapters[name].load_file_tensors(own)
