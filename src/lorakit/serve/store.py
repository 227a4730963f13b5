"""Where served adapters come from: a root folder on disk, and an LRU cache in host memory.

Every sub-folder of the adapter root that holds `adapter_config.json` is servable under its folder
name; more adapters are registered at run time (vLLM's `load_lora_adapter`). Every file read is
resolved, symlinks followed, and must lie inside the root; special files (FIFOs, devices) are
refused before they are opened (`LoraWeights.from_folder`). Without a root, registering a path is
refused unless the store was made with `allow_any_path=True` (a library user, or an operator who
trusts every client: `lorakit serve --allow-any-adapter-path`). Errors name the adapter and the
problem, never a server path (the path is logged on the server, logger "lorakit.serve").

One budget, `host_budget_bytes`, bounds every adapter byte held in host memory, each counted once:
the LRU cache of loaded adapters (`LoraWeights`, fp32), and the tensors a `MultiLoraModel` keeps
resident in host memory (on a CPU engine the resident factors are the cached tensors themselves;
on a GPU they live in the device pool and hold no host memory). Least recently used cache entries
are dropped when the budget is exceeded; resident adapters are never dropped by the store: the
engine evicts idle ones when it needs room (`room_for_resident`), and an adapter loaded while the
resident ones fill the budget is returned without being cached. `stats["host_bytes"]` is that
figure, measured from the tensors' storages.

Thread-safe, and no file is read under the store's lock: a slow or large load never delays a
lookup of another adapter. Concurrent lookups of one adapter share one read (an in-flight load per
name and path), and at most `max_concurrent_loads` adapters are read at once, which bounds the
memory loads take on top of the budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from torch import nn

from lorakit.core.io import CONFIG_NAME
from lorakit.serve.errors import (
    AdapterConflict,
    AdapterPathError,
    AdapterTooLarge,
    CorruptAdapter,
    InvalidRequest,
    ServeError,
    UnknownAdapter,
)
from lorakit.serve.lora_batch import LoraWeights, adapter_signature

__all__ = ["AdapterStore", "AdapterTooLarge", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")  # used with fullmatch: the whole name
_HEADER_SLACK = 2**20
log = logging.getLogger("lorakit.serve")


def valid_name(name) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class _Load:
    """One read of one adapter in flight; lookups of the same adapter meanwhile wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.weights: LoraWeights | None = None
        self.error: BaseException | None = None

    def result(self) -> LoraWeights:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.weights


class AdapterStore:
    """Disk -> host LRU cache of servable adapters.

    root: folder whose sub-folders are adapters (None: only registered ones).
    host_budget_bytes: the most bytes the adapters held in host memory may take (cache and resident).
    base_model: lets non-LoRA adapters be converted on load (see `LoraWeights.from_folder`) and
        checks every adapter's shapes against it at registration.
    allow_any_path: without a root, whether `register` accepts any path on disk (default: it
        refuses every path, with AdapterPathError). Ignored with a root: paths must lie inside it.
    max_concurrent_loads: adapters read from disk at the same time, at most.
    """

    def __init__(self, root: str | os.PathLike | None, *, host_budget_bytes: int = 2 * 2**30,
                 base_model: nn.Module | None = None, allow_any_path: bool = False, max_concurrent_loads: int = 2):
        if host_budget_bytes <= 0:
            raise InvalidRequest(f"host_budget_bytes={host_budget_bytes} must be positive")
        if max_concurrent_loads < 1:
            raise InvalidRequest(f"max_concurrent_loads={max_concurrent_loads} must be >= 1")
        self.root = Path(os.path.realpath(root)) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise AdapterPathError(f"adapter root {str(root)!r} is not a folder; create it or pass another one")
        self.host_budget_bytes = int(host_budget_bytes)
        self.base_model = base_model
        self.allow_any_path = bool(allow_any_path)
        # A tensor file larger than this cannot fit the budget in fp32 (fp64 files halve).
        self.max_file_bytes = 2 * self.host_budget_bytes + _HEADER_SLACK
        self._registered: dict[str, Path] = {}
        self._generation: dict[str, int] = {}  # bumped on (un)registration: a load begun before is not cached
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._cache_storages: dict[int, list[int]] = {}  # storage address -> [bytes, cache entries using it]
        self._residents: weakref.WeakSet = weakref.WeakSet()  # MultiLoraModels holding our tensors
        self._inflight: dict[tuple[str, Path], _Load] = {}
        self._verdicts: dict[str, tuple[tuple, bool]] = {}  # name -> (files' signature, servable)
        self._counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0}
        self._lock = threading.Lock()
        self._load_slots = threading.BoundedSemaphore(max_concurrent_loads)

    # --- names -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Servable names: registered ones and the root's sub-folders holding adapter_config.json,
        without those known not to load. A folder is checked once per version of its files (stat()
        signature): config, tensor-file header, files inside the root; a full load that failed marks
        it broken until its files change. Tensors are never read here; broken folders are logged."""
        return sorted(name for name, path in self._candidates().items() if self._servable(name, path))

    def __contains__(self, name) -> bool:
        if not valid_name(name):
            return False
        with self._lock:
            if name in self._registered:
                return True
        try:
            return self._root_folder(name) is not None
        except AdapterPathError:
            return False

    # --- registration ------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike) -> None:
        """Serve the adapter in `path` as `name`, validated now (the folder is read and cached).

        `path` is relative to the root, or absolute. AdapterPathError when it resolves outside the
        root, or when the store has no root and does not allow any path; CorruptAdapter when it
        cannot be served; AdapterConflict when `name` already serves another folder (the same
        folder: no-op).
        """
        if not valid_name(name):
            raise InvalidRequest(f"adapter name {name!r} is invalid: use 1-128 letters, digits, '_', '-', '.' or ':' "
                                 "(not starting with '.' or '-')")
        resolved = self._allowed(name, path)
        current = self._served_path(name)
        if current is not None:
            if current == resolved:
                return
            raise AdapterConflict(f"adapter {name!r} already serves another folder; unload it first or pick another name")
        weights = self._load_shared(name, resolved, generation=None)
        with self._lock:
            current = self._registered.get(name)
            if current is not None and current != resolved:  # registered meanwhile by another request
                raise AdapterConflict(f"adapter {name!r} already serves another folder; unload it first or pick another name")
            self._registered[name] = resolved
            self._generation[name] = self._generation.get(name, 0) + 1
            self._insert(weights)

    def unregister(self, name: str) -> None:
        """Stop serving a registered adapter and drop the store's copy (an `Engine` also drops its
        resident copy: `Engine.forget_adapter`, which the server's unload route calls)."""
        with self._lock:
            registered = isinstance(name, str) and name in self._registered
            if registered:
                del self._registered[name]
                self._forget(name)
        if registered:
            return
        if valid_name(name) and self._root_folder(name) is not None:
            raise AdapterConflict(f"adapter {name!r} is a sub-folder of the adapter root, not a registered one; "
                                  "remove or rename that folder to stop serving it")
        raise UnknownAdapter(f"no adapter named {name!r} is registered")

    # --- the cache ---------------------------------------------------------------------------
    def get(self, name: str) -> LoraWeights:
        """The adapter's weights: from the cache (a hit), else read from disk (a miss, a load)."""
        if not valid_name(name):
            raise UnknownAdapter(f"no adapter named {name!r}; adapter names are 1-128 letters, digits, '_', '-', '.' or ':'")
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                self._counts["hits"] += 1
                return self._cache[name]
            path = self._registered.get(name)
            generation = self._generation.get(name, 0)
        if path is None:
            path = self._root_folder(name)
        if path is None:
            raise UnknownAdapter(f"no adapter named {name!r}; servable adapters: {self._preview()}")
        return self._load_shared(name, path, generation)

    def room_for_resident(self, extra_bytes: int) -> bool:
        """Whether resident adapters may hold `extra_bytes` more host memory within the budget
        (cached adapters that are not resident can always be dropped to make room)."""
        with self._lock:
            return sum(self._resident_storages().values()) + extra_bytes <= self.host_budget_bytes

    def attach_resident(self, holder) -> None:
        """Count the host memory `holder.host_storages()` reports (a MultiLoraModel) in the budget."""
        with self._lock:
            self._residents.add(holder)

    @contextlib.contextmanager
    def resident_update(self) -> Iterator[None]:
        """Held by a resident holder while it changes what it holds: afterwards, and before anyone
        reads the figure, cache entries over the budget are dropped."""
        with self._lock:
            yield
            self._enforce_budget()

    @property
    def stats(self) -> dict:
        with self._lock:
            resident = self._resident_storages()
            cache_bytes = sum(size for size, _ in self._cache_storages.values())
            host = cache_bytes + sum(size for ptr, size in resident.items() if ptr not in self._cache_storages)
            return {**self._counts, "host_bytes": host, "host_budget_bytes": self.host_budget_bytes,
                    "cache_bytes": cache_bytes, "resident_host_bytes": sum(resident.values()),
                    "registered": len(self._registered), "cached": len(self._cache)}

    # --- loading -------------------------------------------------------------------------------
    def _load_shared(self, name: str, path: Path, generation: int | None) -> LoraWeights:
        """Read `path` once however many ask at the same time, outside the lock. The result is cached
        when `generation` (the name's registration state when the lookup began) is still current;
        None: the caller (register) caches it."""
        key = (name, path)
        with self._lock:
            load = self._inflight.get(key)
            owner = load is None
            if owner:
                load = self._inflight[key] = _Load()
                self._counts["misses"] += 1
            else:
                self._counts["hits"] += 1  # served by a read already under way: no second read
        if not owner:
            return load.result()
        try:
            with self._load_slots:
                weights = self._read(name, path)
            with self._lock:
                if generation is not None and self._generation.get(name, 0) == generation:
                    self._insert(weights)
            load.weights = weights
            return weights
        except BaseException as error:
            load.error = error
            raise
        finally:
            with self._lock:
                if self._inflight.get(key) is load:
                    del self._inflight[key]
            load.done.set()

    def _read(self, name: str, path: Path) -> LoraWeights:
        signature = self._signature(name, path)
        try:
            weights = LoraWeights.from_folder(name, path, base_model=self.base_model, within=self.root,
                                              max_file_bytes=self.max_file_bytes)
            if weights.nbytes > self.host_budget_bytes:
                raise AdapterTooLarge(
                    f"adapter {name!r} needs {weights.nbytes:,} bytes of host memory, more than the store's whole "
                    f"budget ({self.host_budget_bytes:,} bytes); raise host_budget_bytes or serve a lower-rank export")
        except ServeError as error:
            self._judge(name, path, signature, False, error)
            raise
        except Exception as error:  # a file's content that got past every check: still the file's fault
            log.exception("adapter %r at %s failed to load", name, path)
            self._judge(name, path, signature, False, error)
            raise CorruptAdapter(f"adapter {name!r} cannot be read: {type(error).__name__}") from None
        with self._lock:
            self._counts["loads"] += 1
        self._judge(name, path, signature, True)
        weights.store = self
        return weights

    # --- the budget (callers hold the lock) --------------------------------------------------------
    def _resident_storages(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for holder in list(self._residents):
            found.update(holder.host_storages())
        return found

    def _insert(self, weights: LoraWeights) -> None:
        self._drop(weights.name)
        self._cache[weights.name] = weights
        for ptr, size in weights.storages().items():
            self._cache_storages.setdefault(ptr, [size, 0])[1] += 1
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Drop least recently used entries until the bytes held fit the budget; an entry whose
        tensors are resident frees nothing and stays (it costs nothing more)."""
        resident = self._resident_storages()
        held = sum(size for size, _ in self._cache_storages.values())
        held += sum(size for ptr, size in resident.items() if ptr not in self._cache_storages)
        for name in list(self._cache):
            if held <= self.host_budget_bytes:
                return
            freed = sum(size for ptr, size in self._cache[name].storages().items()
                        if ptr not in resident and self._cache_storages[ptr][1] == 1)
            if freed:
                self._drop(name)
                held -= freed
                self._counts["evictions"] += 1

    def _drop(self, name: str) -> None:
        weights = self._cache.pop(name, None)
        if weights is not None:
            for ptr in weights.storages():
                entry = self._cache_storages[ptr]
                entry[1] -= 1
                if entry[1] == 0:
                    del self._cache_storages[ptr]

    def _forget(self, name: str) -> None:
        self._generation[name] = self._generation.get(name, 0) + 1
        self._verdicts.pop(name, None)
        self._drop(name)

    # --- paths (no lock held: these stat the disk) --------------------------------------------------
    def _allowed(self, name: str, path) -> Path:
        """A registration's path, resolved; AdapterPathError when it may not be served. Decided from
        the path alone, so the answer says nothing about what exists outside the root."""
        if self.root is None and not self.allow_any_path:
            raise AdapterPathError(
                f"cannot load adapter {name!r} by path: this server has no adapter root, and loading from any path "
                "is disabled. Start it with --adapters DIR (paths then lie inside DIR), or, if every client is trusted, "
                "--allow-any-adapter-path (AdapterStore(None, allow_any_path=True))")
        try:
            candidate = Path(path)
            if self.root is not None and not candidate.is_absolute():
                candidate = self.root / candidate
            resolved = Path(os.path.realpath(candidate))
        except (TypeError, ValueError, OSError):
            raise InvalidRequest(f"the path given for adapter {name!r} is not a usable path") from None
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise AdapterPathError(f"the path given for adapter {name!r} resolves outside the adapter root; copy the "
                                   "adapter into a folder under the root and pass that folder's path")
        return resolved

    def _served_path(self, name: str) -> Path | None:
        """The folder `name` serves now (registered, or a root sub-folder), resolved."""
        with self._lock:
            registered = self._registered.get(name)
        if registered is not None:
            return registered
        folder = self._root_folder(name)
        return None if folder is None else Path(os.path.realpath(folder))

    def _root_folder(self, name: str) -> Path | None:
        """root/name when it is an adapter folder; AdapterPathError when it leads out of the root
        (decided before anything outside is looked at)."""
        if self.root is None or not valid_name(name):
            return None
        folder = self.root / name
        if not Path(os.path.realpath(folder)).is_relative_to(self.root):
            raise AdapterPathError(f"adapter {name!r} is a link leading outside the adapter root; the store "
                                   "serves only folders inside it")
        if not (os.path.lexists(folder / CONFIG_NAME) or os.path.lexists(folder / "default" / CONFIG_NAME)):
            return None
        return folder

    def _candidates(self) -> dict[str, Path]:
        with self._lock:
            found = dict(self._registered)
        if self.root is not None:
            try:
                entries = list(os.scandir(self.root))
            except OSError as error:
                log.warning("cannot list the adapter root %s: %s", self.root, error)
                entries = []
            for entry in entries:
                if entry.name not in found and valid_name(entry.name):
                    try:
                        folder = self._root_folder(entry.name)
                    except AdapterPathError:
                        folder = None
                    if folder is not None:
                        found[entry.name] = folder
        return found

    def _signature(self, name: str, path: Path) -> tuple | None:
        try:
            return adapter_signature(name, path, within=self.root)
        except ServeError:
            return None

    def _servable(self, name: str, path: Path) -> bool:
        signature = self._signature(name, path)
        if signature is None:
            return False
        with self._lock:
            verdict = self._verdicts.get(name)
        if verdict is not None and verdict[0] == signature:
            return verdict[1]
        try:
            LoraWeights.probe(name, path, self.base_model, within=self.root, max_file_bytes=self.max_file_bytes)
        except ServeError as error:
            self._judge(name, path, signature, False, error)
            return False
        self._judge(name, path, signature, True)
        return True

    def _judge(self, name: str, path: Path, signature: tuple | None, servable: bool, error: BaseException | None = None) -> None:
        if signature is None:
            return
        with self._lock:
            before = self._verdicts.get(name)
            self._verdicts[name] = (signature, servable)
        if not servable and before != (signature, False):
            log.warning("adapter %r (%s) is not servable: %s", name, path, error)

    def _preview(self) -> str:
        names = self.names()
        return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") if names else "none"
