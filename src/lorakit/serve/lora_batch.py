"""Batched heterogeneous LoRA: one forward of the base model, a different adapter per batch row.

S-LoRA (Sheng et al., "S-LoRA: Serving Thousands of Concurrent LoRA Adapters", arXiv 2311.03285):
for a targeted layer with base weight W, row t of the batch with adapter a(t) gets

    Y_t = X_t W^T + s_a B_a A_a X_t          A_a in R^{r_a x in}, B_a in R^{out x r_a}, s_a its scale,

the base GEMM X W^T shared by the whole batch, and Y_t = X_t W^T exactly for a row without adapter.
Rows are batch rows of any shape (N, ..., in): (batch, seq, in) at prefill, (batch, 1, in) at
decode, or S-LoRA's token matrix (T, in). Three evaluations of the LoRA term, which agree:

- `lora_loop`: row by row (the reference);
- `lora_segment` (mode "segment", the default): group rows by adapter; per adapter present one
  shrink H = X_rows A^T and one expand H (s B)^T, index_add-ed into the base output. Every row uses
  exactly its own rank, no padding, no per-row copy of the factors;
- `lora_padded_bmm` (mode "bmm"): pad every A to R rows and B to R columns with zeros, gather each
  row's factors and run two torch.bmm. `MultiLoraModel` buckets ranks by power of two (r = 5..8
  pad to 8, 9..16 to 16, ...) instead of padding to the batch's largest rank. Padding rows are
  exactly 0, so the result is exact; the cost is the padded FLOPs and the per-row gather copy.

`LoraWeights` is one adapter in serving form (host memory, fp32); `MultiLoraModel` puts forward
hooks on the targeted nn.Linear layers of an unmodified HF model (the union of every active
adapter's modules) and routes rows to adapters inside `with multi.rows([...]):`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load
from torch import nn

from lorakit.core.config import AdapterConfig, require_choice
from lorakit.core.errors import LorakitError
from lorakit.core.io import (
    CONFIG_NAME,
    EXTRAS_KEY,
    KEY_PREFIX,
    MAX_CONFIG_BYTES,
    PICKLE_NAMES,
    WEIGHTS_NAME,
    adapter_config_from_dict,
    extras_from_metadata,
    parse_config_json,
    refuse_non_finite,
)
from lorakit.core.registry import weight_initialiser
from lorakit.serve.errors import AdapterPathError, AdapterTooLarge, CorruptAdapter, UnknownAdapter

MODES = ("segment", "bmm")
Factors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scale
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# --- the three evaluations, on rows (dim 0) ------------------------------------------------------

def rank_bucket(rank: int) -> int:
    """The power of two a rank is padded to in mode "bmm" (1, 2, 4, 8, 16, ...)."""
    return 1 << max(rank - 1, 0).bit_length()


def _groups(ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Adapter id -> row indices (ascending), for every id >= 0 present (-1 = no adapter)."""
    return {int(a): (ids == a).nonzero().squeeze(1) for a in ids.unique().tolist() if a >= 0}


def lora_loop(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors]) -> torch.Tensor:
    """The LoRA term row by row: out[t] = s B A x[t] for adapter ids[t], 0 where ids[t] = -1."""
    out = x.new_zeros(*x.shape[:-1], adapters[0][1].shape[0])
    for t, a in enumerate(ids.tolist()):
        if a >= 0:
            A, B, scale = adapters[a]
            out[t] = scale * (x[t] @ A.T @ B.T)
    return out


def segment_into(out: torch.Tensor, x: torch.Tensor,
                 groups: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """out[rows] += s (x[rows] A^T) B^T for each (rows, A, B, s): one shrink + expand per adapter.
    The scale multiplies the (rows, out) result, so the factors are used as stored (no scaled copy of B)."""
    for rows, A, B, scale in groups:
        delta = F.linear(F.linear(x.index_select(0, rows), A), B)
        if scale != 1.0:
            delta = delta * scale
        out = out.index_add_(0, rows, delta) if not torch.is_grad_enabled() else out.index_add(0, rows, delta)
    return out


def lora_segment(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors]) -> torch.Tensor:
    """The LoRA term by segments (S-LoRA's gather without padding)."""
    out = x.new_zeros(*x.shape[:-1], adapters[0][1].shape[0])
    groups = [(rows, *adapters[a]) for a, rows in _groups(ids).items()]
    return segment_into(out, x, groups)


def pad_factors(adapters: Sequence[Factors], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks (k, rank, in) of A and (k, out, rank) of s B, zero-padded beyond each adapter's rank."""
    A0, B0, _ = adapters[0]
    A_stack = A0.new_zeros(len(adapters), rank, A0.shape[1])
    B_stack = B0.new_zeros(len(adapters), B0.shape[0], rank)
    for i, (A, B, scale) in enumerate(adapters):
        if A.shape[0] > rank:
            raise ValueError(f"adapter {i} has rank {A.shape[0]}, above the padded rank {rank}")
        A_stack[i, : A.shape[0]] = A
        B_stack[i, :, : A.shape[0]] = B * scale
    return A_stack, B_stack


def bmm_into(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
             A_stack: torch.Tensor, B_stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out[rows] += bmm(bmm(x[rows], A_stack[slots]^T), B_stack[slots]^T); returns (out, shrink)."""
    xs = x.index_select(0, rows)
    n = xs.shape[0]
    h = torch.bmm(xs.reshape(n, -1, xs.shape[-1]), A_stack.index_select(0, slots).transpose(1, 2))
    y = torch.bmm(h, B_stack.index_select(0, slots).transpose(1, 2)).reshape(*xs.shape[:-1], B_stack.shape[1])
    out = out.index_add_(0, rows, y) if not torch.is_grad_enabled() else out.index_add(0, rows, y)
    return out, h.reshape(*xs.shape[:-1], A_stack.shape[1])


def lora_padded_bmm(x: torch.Tensor, ids: torch.Tensor, adapters: Sequence[Factors], rank: int | None = None,
                    return_shrink: bool = False):
    """The LoRA term with every adapter padded to `rank` (default: the largest) and two bmm.
    With `return_shrink`, also the shrink H (rows with an adapter, in row order, padded width)."""
    rank = rank or max(A.shape[0] for A, _, _ in adapters)
    A_stack, B_stack = pad_factors(adapters, rank)
    rows = (ids >= 0).nonzero().squeeze(1)
    out = x.new_zeros(*x.shape[:-1], B_stack.shape[1])
    out, h = bmm_into(out, x, rows, ids.index_select(0, rows), A_stack, B_stack)
    return (out, h) if return_shrink else out


# --- one adapter in serving form ------------------------------------------------------------------

@dataclass
class LoraWeights:
    """An adapter as (A, B, scale) per module path of the base model, fp32 on the host.

    `conversion_error` is the largest per-layer relative Frobenius error ||dW - s B A|| / ||dW|| of
    an adapter converted from another family (0 for a LoRA file read as it is). `store` is the
    `AdapterStore` that produced it (None otherwise): a `MultiLoraModel` that keeps these tensors
    resident reports them to that store, so one budget counts every adapter byte once.
    """

    name: str
    modules: dict[str, Factors]
    source: str | None = None
    conversion_error: float = 0.0
    store: object = field(default=None, repr=False, compare=False)
    nbytes: int = field(init=False)
    max_rank: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(A.nbytes + B.nbytes for A, B, _ in self.modules.values())
        self.max_rank = max((A.shape[0] for A, _, _ in self.modules.values()), default=0)

    def storages(self) -> dict[int, int]:
        """The host memory these tensors hold: storage address -> bytes (shared storage counted once)."""
        return tensor_storages(t for A, B, _ in self.modules.values() for t in (A, B))

    @classmethod
    def from_folder(cls, name: str, path: str | Path, base_model: nn.Module | None = None, *,
                    within: Path | None = None, max_file_bytes: int | None = None) -> "LoraWeights":
        """Read a LoRA folder (PEFT's or lorakit's): per module r and alpha from `r`/`lora_alpha` or
        their `rank_pattern`/`alpha_pattern` overrides, s = alpha / r (alpha / sqrt(r) with
        `use_rslora`), tensors `base_model.model.<path>.lora_A.weight` (r, in) / `lora_B.weight`
        (out, r). Safetensors only; never unpickles.

        Every file (adapter_config.json, adapter_model.safetensors, and PEFT's `default/` sub-folder
        when the config is there) is resolved, symlinks followed, and must lie inside `within` when
        given (AdapterPathError otherwise); it must be a regular file, checked before it is opened (a
        FIFO, device or socket is refused, never opened, so nothing blocks), and is read once through
        one descriptor (O_NOFOLLOW | O_NONBLOCK), no larger than `max_file_bytes` (AdapterTooLarge).
        Error messages name the adapter and the file inside its folder, never a server path.

        An adapter that is not plain B A factors (DoRA, PEFT-style PiSSA/OLoRA files, any other
        lorakit family) is converted when `base_model` is given: each layer's exact update dW
        (`lorakit.export.adapter_deltas`, measured against the untouched base, which stays
        untouched) is replaced by its best rank-R approximation (truncated SVD, scale 1), R being
        the adapter's own rank (`r`, per module for DoRA; the numerical rank of dW for a family
        without `r`). That is exact when rank(dW) <= R (VeRA, LoRA-XS, ...) and an approximation
        otherwise (DoRA, Bone/MiSS, ...): `conversion_error` says how close. Without `base_model`
        such a folder raises CorruptAdapter naming the `lorakit export` command that converts it.
        Anything unreadable raises CorruptAdapter, never another exception.
        """
        files = _AdapterFiles(name, Path(path), within, max_file_bytes)
        config = files.config()
        if _plain_lora(name, config, base_model):
            weights = cls(name, _lora_modules(name, files.tensors(), config), source=str(files.folder))
        else:
            weights = files.converted(config, base_model)
        if base_model is not None:
            check_fits(weights, base_model)
        return weights

    @staticmethod
    def probe(name: str, path: str | Path, base_model: nn.Module | None = None, *, within: Path | None = None,
              max_file_bytes: int | None = None) -> tuple:
        """What `from_folder` can check without reading tensors: the files (as it checks them), the
        config, the safetensors header, whether this kind of adapter can be served. Raises as
        `from_folder` does; returns the files' signature (see `adapter_signature`)."""
        files = _AdapterFiles(name, Path(path), within, max_file_bytes)
        _plain_lora(name, files.config(), base_model)
        files.header()
        return files.signature()


def adapter_signature(name: str, path: str | Path, *, within: Path | None = None) -> tuple:
    """The adapter folder's files as they are on disk now (resolved folder; device, inode, size and
    mtime of the config and the tensor file), from stat() alone, for caching what was found there."""
    return _AdapterFiles(name, Path(path), within, None).signature()


def _plain_lora(name: str, config, base_model: nn.Module | None) -> bool:
    """True for plain B A factors; False for another kind that `base_model` lets us convert;
    CorruptAdapter for another kind without a base model."""
    init = getattr(config, "init", None)
    if config.method == "lora" and not config.use_dora and (not isinstance(init, str) or weight_initialiser(init) is None):
        return True
    if base_model is None:
        rank = getattr(config, "r", None)
        kind = "DoRA" if getattr(config, "use_dora", False) else (
            f"LoRA with init={init!r} (factors relative to a rewritten W)" if config.method == "lora" else repr(config.method))
        raise CorruptAdapter(
            f"adapter {name!r} is a {kind} adapter, not plain LoRA factors, so it cannot be served as it is. "
            f"Convert it once: `lorakit export ADAPTER_FOLDER OUT --to lora --rank {rank or 'R'}` and serve OUT "
            "(or give the adapter store the base model, which converts it on load)")
    return False


def tensor_storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """Host (CPU) storages behind `tensors`: address -> bytes, each storage once."""
    found = {}
    for tensor in tensors:
        if tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


# --- reading an adapter folder safely ---------------------------------------------------------

_HEADER_MAX_BYTES = 100 * 2**20  # the largest header the safetensors library accepts
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class _AdapterFiles:
    """The files of one adapter folder, each resolved, checked and read once (see `from_folder`)."""

    def __init__(self, name: str, path: Path, within: Path | None, max_file_bytes: int | None):
        self.name, self.within, self.max_file_bytes = name, within, max_file_bytes
        folder = self._resolve(path, "the adapter folder")
        if not _is_dir(folder):
            raise CorruptAdapter(f"adapter {name!r}: no adapter folder at the given path; point at the folder that "
                                 "save_adapter or PEFT's save_pretrained wrote")
        if self._status(folder / CONFIG_NAME, CONFIG_NAME) is None:
            nested = folder / "default"  # PEFT puts an adapter saved under its default name in a sub-folder
            if self._status(nested / CONFIG_NAME, f"default/{CONFIG_NAME}") is None:
                raise CorruptAdapter(f"adapter {name!r}: the folder holds no {CONFIG_NAME} (nor default/{CONFIG_NAME}); "
                                     "point at the folder that save_adapter or PEFT's save_pretrained wrote")
            folder = self._resolve(nested, "default/")
        self.folder = folder
        self._weights: bytes | None = None
        self._header: dict | None = None

    # --- the two files ---
    def config(self) -> AdapterConfig:
        raw = self._read(CONFIG_NAME, MAX_CONFIG_BYTES)
        data = _parsed(self.name, CONFIG_NAME, lambda: parse_config_json(raw, CONFIG_NAME))
        if EXTRAS_KEY not in data:
            data[EXTRAS_KEY] = extras_from_metadata(self._metadata())
        return _parsed(self.name, CONFIG_NAME, lambda: adapter_config_from_dict(data, CONFIG_NAME))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights, refused (as `load_adapter` refuses them) when any holds NaN or inf: such an
        adapter could only fail every request that uses it, at sampling time."""
        tensors = _parsed(self.name, WEIGHTS_NAME, lambda: safetensors_load(self._weight_bytes()))
        _parsed(self.name, WEIGHTS_NAME, lambda: refuse_non_finite(tensors, WEIGHTS_NAME))
        return tensors

    def converted(self, config, base_model: nn.Module) -> "LoraWeights":
        """Converted from a private copy of the bytes read here, so the conversion (which reads a
        folder itself) never touches the served folder again."""
        raw_config, raw_weights = self._read(CONFIG_NAME, MAX_CONFIG_BYTES), self._weight_bytes()
        with tempfile.TemporaryDirectory(prefix="lorakit-adapter-") as private:
            copy_folder = Path(private)
            (copy_folder / CONFIG_NAME).write_bytes(raw_config)
            (copy_folder / WEIGHTS_NAME).write_bytes(raw_weights)
            try:
                weights = _converted(self.name, copy_folder, config, base_model)
            except CorruptAdapter as err:  # the conversion names files by the private copy's path
                message = str(err).replace(f"{copy_folder}{os.sep}", "").replace(str(copy_folder), "the adapter folder")
                raise CorruptAdapter(message) from None
        weights.source = str(self.folder)
        return weights

    def _weight_bytes(self) -> bytes:
        if self._weights is None:
            self._weight_status()
            self._weights = self._read(WEIGHTS_NAME, self.max_file_bytes)
        return self._weights

    def _weight_status(self) -> None:
        """CorruptAdapter when there is no tensor file (naming a pickle file found instead)."""
        if self._status(self.folder / WEIGHTS_NAME, WEIGHTS_NAME) is None:
            pickled = [n for n in PICKLE_NAMES if self._status(self.folder / n, n) is not None]
            if pickled:
                raise CorruptAdapter(
                    f"adapter {self.name!r} holds {pickled[0]}, a pickle file; lorakit never unpickles files (they "
                    "can run code). Convert it where you trust it, e.g. in PEFT: "
                    "PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)")
            raise CorruptAdapter(f"adapter {self.name!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")

    def header(self) -> dict:
        """The safetensors header (tensor names, dtypes, shapes; metadata), read alone: 8 bytes of
        length, then the JSON. CorruptAdapter when it is not one."""
        if self._header is None:
            self._weight_status()
            with self._opened(WEIGHTS_NAME, self.max_file_bytes) as (fd, size):
                length = int.from_bytes(_read_all(fd, 8, None), "little")
                if length > min(size - 8, _HEADER_MAX_BYTES):
                    raise CorruptAdapter(f"adapter {self.name!r}: {WEIGHTS_NAME} is not a safetensors file (its header "
                                         f"length {length:,} does not fit the file); the file is corrupt or truncated")
                raw = _read_all(fd, length, None)
            try:
                header = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
            if not isinstance(header, dict):
                raise CorruptAdapter(f"adapter {self.name!r}: {WEIGHTS_NAME} is not a safetensors file (its header is not "
                                     "a JSON object); the file is corrupt or truncated")
            self._header = header
        return self._header

    def signature(self) -> tuple:
        """What identifies the two files as they are on disk now (device, inode, size, mtime), from
        stat() alone: a changed signature means changed files."""
        def sign(path: Path, what: str):
            found = self._status(path, what)
            return None if found is None else (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
        return str(self.folder), sign(self.folder / CONFIG_NAME, CONFIG_NAME), sign(self.folder / WEIGHTS_NAME, WEIGHTS_NAME)

    def _metadata(self) -> dict[str, str]:
        """The safetensors header's metadata ({} when the file is missing or unreadable: reading the
        tensors reports that)."""
        try:
            metadata = self.header().get("__metadata__")
        except CorruptAdapter:
            return {}
        return metadata if isinstance(metadata, dict) else {}

    # --- checked file access ---
    def _resolve(self, path: Path, what: str) -> Path:
        """`path` with every symlink resolved; AdapterPathError when that leaves `within`."""
        resolved = Path(os.path.realpath(path))
        if self.within is not None and not resolved.is_relative_to(self.within):
            raise AdapterPathError(f"adapter {self.name!r}: {what} resolves (through a symlink) outside the adapter "
                                   "root; copy the file into the adapter's folder instead of linking to it")
        return resolved

    def _status(self, path: Path, what: str) -> os.stat_result | None:
        """stat() of the resolved file (None: it does not exist). Never opens it."""
        resolved = self._resolve(path, what)
        try:
            return os.stat(resolved)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise CorruptAdapter(f"adapter {self.name!r}: {what} cannot be read ({err.strerror})") from None

    def _read(self, filename: str, limit: int | None) -> bytes:
        with self._opened(filename, limit) as (fd, _):
            return _read_all(fd, limit, lambda: AdapterTooLarge(
                f"adapter {self.name!r}: {filename} grew past {limit:,} bytes while it was read"))

    @contextlib.contextmanager
    def _opened(self, filename: str, limit: int | None) -> Iterator[tuple[int, int]]:
        """(descriptor, size) of a checked regular file of the folder, closed afterwards."""
        path = self._resolve(self.folder / filename, filename)
        found = self._status(path, filename)
        if found is None:
            raise CorruptAdapter(f"adapter {self.name!r}: {filename} is missing")
        if not stat.S_ISREG(found.st_mode):
            kind = next((text for test, text in _KINDS if test(found.st_mode)), "not a regular file")
            raise CorruptAdapter(f"adapter {self.name!r}: {filename} is {kind}, not a regular file; "
                                 "an adapter folder holds plain files")
        if limit is not None and found.st_size > limit:
            raise AdapterTooLarge(f"adapter {self.name!r}: {filename} is {found.st_size:,} bytes, more than this "
                                  f"store reads for one adapter ({limit:,} bytes); raise the host budget or serve a "
                                  "lower-rank export")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:  # ELOOP: replaced by a symlink since it was resolved
            raise CorruptAdapter(f"adapter {self.name!r}: {filename} cannot be opened ({err.strerror}); "
                                 "retry once the folder stops changing") from None
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino) or not stat.S_ISREG(opened.st_mode):
                raise CorruptAdapter(f"adapter {self.name!r}: {filename} was replaced while it was opened; "
                                     "retry once the folder stops changing")
            self._check_opened(fd, filename)
            yield fd, opened.st_size
        finally:
            os.close(fd)

    def _check_opened(self, fd: int, filename: str) -> None:
        """Where available, ask the kernel where the opened file really is (closes the window between
        resolving a path and opening it, in which a folder on the way could be swapped for a link)."""
        if self.within is None or not os.path.isdir("/proc/self/fd"):
            return
        try:
            actual = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            return
        if not actual.is_relative_to(self.within):
            raise AdapterPathError(f"adapter {self.name!r}: {filename} was opened outside the adapter root "
                                   "(the folder changed while it was read); nothing was read")


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _read_all(fd: int, limit: int | None, too_large) -> bytes:
    """Everything left in `fd`; with `too_large` None, exactly `limit` bytes (fewer at the end of the file)."""
    chunks, total = [], 0
    while True:
        want = 1 << 20 if too_large is not None or limit is None else min(1 << 20, limit - total)
        if want == 0:
            return b"".join(chunks)
        try:
            chunk = os.read(fd, want)
        except BlockingIOError:  # only a special file would; it was refused before opening
            raise CorruptAdapter("an adapter file would block when read; it is not a regular file") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if too_large is not None and limit is not None and total > limit:
            raise too_large()


def _parsed(name: str, filename: str, parse):
    """parse(), with any error in the file's content (a wrong field type, a bad pattern, bytes that are
    not safetensors) turned into CorruptAdapter naming the adapter and the file."""
    try:
        return parse()
    except (CorruptAdapter, AdapterPathError):
        raise
    except MemoryError:
        raise
    except Exception as err:  # the content comes from a file: every failure is the file's
        if isinstance(err, LorakitError):  # names the file and the field already
            raise CorruptAdapter(f"adapter {name!r}: {err}") from None
        raise CorruptAdapter(f"adapter {name!r}: {filename} cannot be read ({type(err).__name__}: {err})") from None


def _lora_modules(name: str, tensors: dict[str, torch.Tensor], config) -> dict[str, Factors]:
    pairs: dict[str, list[torch.Tensor | None]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        rest = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        slot = next((i for i, suffix in enumerate(_SUFFIXES) if rest is not None and rest.endswith(suffix)), None)
        if slot is None:
            unexpected.append(key)
        else:
            pairs.setdefault(rest[: -len(_SUFFIXES[slot])], [None, None])[slot] = tensor
    where = f"adapter {name!r}"
    if unexpected:
        raise CorruptAdapter(f"{where} holds tensors a LoRA server does not apply, e.g. {sorted(unexpected)[:3]} "
                             "(biases, embedding LoRA, modules_to_save); export it without them")
    if not pairs:
        raise CorruptAdapter(f"{where} holds no lora_A/lora_B tensors")
    modules = {}
    for path, (A, B) in sorted(pairs.items()):
        if A is None or B is None:
            raise CorruptAdapter(f"{where}: {path} has lora_{'A' if A is None else 'B'}.weight missing")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CorruptAdapter(f"{where}: {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                 "not (r, in) and (out, r)")
        if not A.is_floating_point() or not B.is_floating_point():
            raise CorruptAdapter(f"{where}: {path} holds {A.dtype}/{B.dtype} tensors, not floating point")
        rank, alpha = _parsed(name, CONFIG_NAME, lambda: config.rank_and_alpha(path))
        if A.shape[0] != rank:
            raise CorruptAdapter(f"{where}: {path} has rank {A.shape[0]} in the file but r={rank} in "
                                 "adapter_config.json (r / rank_pattern); the folder's files do not belong together")
        A, B = A.float().contiguous(), B.float().contiguous()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CorruptAdapter(f"{where}: {path} holds NaN or infinite values")
        modules[path] = (A, B, float(_parsed(name, CONFIG_NAME, lambda: config.scaling(rank, alpha))))
    return modules


def _converted(name: str, folder: Path, config, base_model: nn.Module) -> LoraWeights:
    """Any lorakit family as LoRA factors (truncated SVD of each layer's dW at the adapter's rank)."""
    from lorakit.export import adapter_deltas
    from lorakit.export.svd import low_rank_factors, relative_error

    init = getattr(config, "init", None)
    rewrites = isinstance(init, str) and weight_initialiser(init) is not None
    shell = _model_copy(base_model, share_weights=not rewrites)
    modules, worst = {}, 0.0
    try:
        for path, _, delta, _ in adapter_deltas(shell, folder, config):
            rank = _conversion_rank(config, path, delta)
            B, A = low_rank_factors(delta, rank)
            worst = max(worst, relative_error(delta, B @ A))
            modules[path] = (A.float().contiguous(), B.float().contiguous(), 1.0)
    except (LorakitError, RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CorruptAdapter(f"adapter {name!r} could not be converted to LoRA: {err}") from None
    if not modules:
        raise CorruptAdapter(f"adapter {name!r} adapts no layer")
    return LoraWeights(name, modules, source=str(folder), conversion_error=worst)


def _conversion_rank(config, path: str, delta: torch.Tensor) -> int:
    if hasattr(config, "rank_and_alpha"):
        rank = config.rank_and_alpha(path)[0]
    else:
        rank = getattr(config, "r", None)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        rank = max(int(torch.linalg.matrix_rank(delta)), 1)
    return min(rank, *delta.shape)


def _model_copy(model: nn.Module, share_weights: bool) -> nn.Module:
    """A copy of the module tree (so a conversion's temporary injection never touches the served
    model), sharing its parameters and buffers unless the conversion rewrites weights."""
    memo = {}
    if share_weights:
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def check_fits(weights: LoraWeights, model: nn.Module) -> None:
    """CorruptAdapter unless every module of `weights` is an nn.Linear of `model` of the right shape."""
    for path, (A, B, _) in weights.modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            raise CorruptAdapter(f"adapter {weights.name!r} adapts {path!r}, which is {found} in this model, not an "
                                 "nn.Linear; was it trained on another base model?")
        if A.shape[1] != module.in_features or B.shape[0] != module.out_features:
            raise CorruptAdapter(
                f"adapter {weights.name!r}: {path} has A {tuple(A.shape)} and B {tuple(B.shape)}, but the layer is "
                f"{module.in_features} -> {module.out_features}; was it trained on another base model?")


# --- many adapters on one model -------------------------------------------------------------------

@dataclass
class _Route:
    """The rows of one `rows()` block: adapter name -> its row indices (on the model's device)."""

    batch: int
    groups: dict[str, torch.Tensor]
    buckets: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def bucket_rows(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, slot of each row in the bucket's stack) for a bucket whose stack holds `names`."""
        if names not in self.buckets:
            present = [(slot, self.groups[n]) for slot, n in enumerate(names) if n in self.groups]
            if not present:
                self.buckets[names] = None
            else:
                rows = torch.cat([r for _, r in present])
                slots = torch.cat([torch.full_like(r, slot) for slot, r in present])
                self.buckets[names] = (rows, slots)
        return self.buckets[names]


class MultiLoraModel:
    """Batched heterogeneous LoRA on an unmodified HF model, through forward hooks on its nn.Linear
    layers (the model's structure, weights and state dict are unchanged; `close()` removes the hooks).

        multi = MultiLoraModel(model)            # mode "segment" (default) or "bmm"
        multi.activate(LoraWeights.from_folder("a", path_a))
        with multi.rows(["a", None, "b"]):       # batch row i uses adapter i; None: the base alone
            logits = model(input_ids).logits

    Adapters of any ranks and any target modules coexist; a row whose adapter does not target a
    layer gets that layer's base output. Activated factors live on each layer's device in its dtype;
    the LoRA term is computed in that dtype. Where a layer is on the CPU in fp32 the factors are the
    adapter's own tensors, not copies, and the scale multiplies the LoRA term; no reference to the
    `LoraWeights` is kept, so a host copy the store evicts is freed. Tensors kept in host memory are
    reported to the weights' `store` (`host_storages`), so its budget counts them. Not thread-safe,
    except `host_storages`: one thread (the engine's loop) activates, deactivates and runs forwards.
    """

    def __init__(self, model: nn.Module, mode: str = "segment"):
        require_choice("mode", mode, MODES)
        self.model = model
        self.mode = mode
        self.active: dict[str, int] = {}  # name -> bytes its activated factors take
        self._device: dict[str, dict[str, Factors]] = {}  # name -> path -> (A, B, scale) next to the layer
        self._users: dict[str, list[str]] = {}  # path -> active adapters adapting it
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._stacks: dict[str, dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]] = {}
        self._route: _Route | None = None
        self._stores: list = []  # stores whose weights were activated here (they read host_storages)
        self._storages_lock = threading.Lock()
        self._host: dict[str, dict[int, int]] = {}  # name -> host storages of its factors
        self._stack_host: dict[str, dict[int, int]] = {}  # path -> host storages of its bmm stacks

    @property
    def device_bytes(self) -> int:
        """Bytes the activated adapters' factors (and, in mode "bmm", their padded stacks) take."""
        factors = sum(A.nbytes + B.nbytes for mods in self._device.values() for A, B, _ in mods.values())
        return factors + sum(A.nbytes + B.nbytes for stacks in self._stacks.values() for _, A, B in stacks.values())

    def host_storages(self) -> dict[int, int]:
        """Host memory this model's adapter tensors hold: storage address -> bytes (thread-safe)."""
        with self._storages_lock:
            found: dict[int, int] = {}
            for storages in itertools.chain(self._host.values(), self._stack_host.values()):
                found.update(storages)
            return found

    def host_bytes_to_activate(self, weights: LoraWeights) -> int:
        """Host bytes `activate(weights)` would add to `host_storages()` (factors that stay on or are
        copied to the CPU; in mode "bmm" the padded stack rows too), before doing it."""
        held = self.host_storages()
        added = 0
        for path, (A, B, _) in weights.modules.items():
            base = self.model.get_submodule(path).weight
            if base.device.type != "cpu":
                continue
            for tensor in (A, B):
                if tensor.dtype == base.dtype:
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in held:
                        held[storage.data_ptr()] = storage.nbytes()
                        added += storage.nbytes()
                else:
                    added += tensor.numel() * base.element_size()
            if self.mode == "bmm":
                added += rank_bucket(A.shape[0]) * (A.shape[1] + B.shape[0]) * base.element_size()
        return added

    def fits_host_budget(self, weights: LoraWeights) -> bool:
        """Whether activating `weights` keeps the adapter bytes held resident within the host budget
        of the store they came from (always, for weights that no store produced); AdapterTooLarge
        when they never can, even with nothing else resident."""
        store = weights.store
        if store is None:
            return True
        needed = self.host_bytes_to_activate(weights)
        if needed > store.host_budget_bytes:
            raise AdapterTooLarge(
                f"adapter {weights.name!r} needs {needed:,} bytes of host memory while in use (its factors in the "
                f"model's dtype{', padded to rank buckets for mode bmm' if self.mode == 'bmm' else ''}), more than the "
                f"whole host budget ({store.host_budget_bytes:,} bytes); raise the budget or serve a lower-rank export")
        return store.room_for_resident(needed)

    def activate(self, weights: LoraWeights) -> None:
        """Put `weights` next to the layers it adapts (replacing an active adapter of that name)."""
        check_fits(weights, self.model)
        if weights.name in self.active:
            self.deactivate(weights.name)
        copies = {}
        for path, (A, B, scale) in weights.modules.items():
            base = self.model.get_submodule(path).weight
            copies[path] = (A.to(base.device, base.dtype), B.to(base.device, base.dtype), scale)
        self._device[weights.name] = copies
        self.active[weights.name] = sum(A.nbytes + B.nbytes for A, B, _ in copies.values())
        for path in copies:
            self._users.setdefault(path, []).append(weights.name)
            self._drop_stacks(path)
            if path not in self._hooks:
                self._hooks[path] = self.model.get_submodule(path).register_forward_hook(self._hook_for(path))
        if weights.store is not None and not any(store is weights.store for store in self._stores):
            self._stores.append(weights.store)
            weights.store.attach_resident(self)
        with self._accounted():
            self._host[weights.name] = tensor_storages(t for A, B, _ in copies.values() for t in (A, B))

    def deactivate(self, name: str) -> None:
        if name not in self.active:
            raise UnknownAdapter(f"adapter {name!r} is not active; active: {sorted(self.active) or 'none'}")
        del self.active[name]
        for path in self._device.pop(name):
            self._users[path].remove(name)
            self._drop_stacks(path)
            if not self._users[path]:
                del self._users[path]
                self._hooks.pop(path).remove()
        with self._accounted():
            self._host.pop(name, None)

    def close(self) -> None:
        """Deactivate everything and remove every hook: the model is plain again."""
        for name in list(self.active):
            self.deactivate(name)

    @contextlib.contextmanager
    def rows(self, row_adapters: Sequence[str | None]) -> Iterator[None]:
        """Forwards inside use adapter `row_adapters[i]` for batch row i (None: base output only)."""
        missing = sorted({n for n in row_adapters if n is not None and n not in self.active})
        if missing:
            raise UnknownAdapter(f"adapter(s) {missing} are not active; activate() them first "
                                 f"(active: {sorted(self.active) or 'none'})")
        device = next(self.model.parameters()).device
        order = list(dict.fromkeys(n for n in row_adapters if n is not None))
        groups = {n: torch.tensor([i for i, m in enumerate(row_adapters) if m == n], device=device) for n in order}
        previous, self._route = self._route, _Route(len(row_adapters), groups)
        try:
            yield
        finally:
            self._route = previous

    # --- the hook ----------------------------------------------------------------------------
    def _hook_for(self, path: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            return self._apply(path, args[0], output)
        return hook  # a plain function: copying the model (adapter conversion) never copies self

    def _apply(self, path: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        route = self._route
        if route is None or not route.groups:
            return None
        if x.shape[0] != route.batch:
            raise ValueError(f"{path}: the batch has {x.shape[0]} rows but rows() was given {route.batch} adapters")
        if self.mode == "segment":
            groups = [(rows, *self._device[name][path]) for name, rows in route.groups.items() if path in self._device[name]]
            return segment_into(out, x, groups)
        for names, A_stack, B_stack in self._bucket_stacks(path).values():
            selected = route.bucket_rows(names)
            if selected is not None:
                out, _ = bmm_into(out, x, *selected, A_stack, B_stack)
        return out

    @contextlib.contextmanager
    def _accounted(self) -> Iterator[None]:
        """Change what `host_storages` reports inside: every store counting it sees the change and
        drops cache entries over its budget at once, never a moment over it."""
        with contextlib.ExitStack() as stack:
            for store in self._stores:
                stack.enter_context(store.resident_update())
            with self._storages_lock:
                yield

    def _drop_stacks(self, path: str) -> None:
        self._stacks.pop(path, None)
        if path in self._stack_host:
            with self._accounted():
                self._stack_host.pop(path, None)

    def _bucket_stacks(self, path: str) -> dict[int, tuple[tuple[str, ...], torch.Tensor, torch.Tensor]]:
        """Per power-of-two rank bucket: the adapters adapting `path` in it and their zero-padded
        factor stacks (rebuilt only when an adapter adapting `path` is (de)activated)."""
        if path not in self._stacks:
            by_bucket: dict[int, list[str]] = {}
            for name in self._users[path]:
                by_bucket.setdefault(rank_bucket(self._device[name][path][0].shape[0]), []).append(name)
            stacks = {}
            for bucket, names in by_bucket.items():
                factors = [self._device[n][path] for n in names]
                stacks[bucket] = (tuple(names), *pad_factors(factors, bucket))
            self._stacks[path] = stacks
            with self._accounted():
                self._stack_host[path] = tensor_storages(t for _, A, B in stacks.values() for t in (A, B))
        return self._stacks[path]
