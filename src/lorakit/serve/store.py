"""Where served adapters come from: a root folder on disk, and an LRU cache in host memory.

Every sub-folder of the adapter root that holds `adapter_config.json` is servable under its folder
name; more adapters are registered at run time (vLLM's `load_lora_adapter`), each path checked to
resolve, symlinks followed, inside the root. Loaded adapters (`LoraWeights`, fp32) are kept in an
LRU cache bounded by `host_budget_bytes`: a hit costs nothing, a miss reads the folder, and the
least recently used adapters are dropped when the budget is exceeded. Thousands of adapters can be
registered while host memory stays within the budget. Thread-safe (one lock around the registry
and the cache; loads happen under it, so one adapter is never read twice at once).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from torch import nn

from lorakit.core.io import CONFIG_NAME
from lorakit.serve.errors import AdapterConflict, AdapterPathError, CorruptAdapter, InvalidRequest, UnknownAdapter
from lorakit.serve.lora_batch import LoraWeights

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")


class AdapterTooLarge(CorruptAdapter):
    """One adapter needs more host memory than the store's whole budget."""


class AdapterStore:
    """Disk -> host LRU cache of servable adapters.

    root: folder whose sub-folders are adapters (None: only registered ones; then `register`
        accepts any path, which suits a library user but not a public server).
    host_budget_bytes: the most bytes the cached adapters' factors may take.
    base_model: lets non-LoRA adapters be converted on load (see `LoraWeights.from_folder`) and
        checks every adapter's shapes against it at registration.
    """

    def __init__(self, root: str | os.PathLike | None, *, host_budget_bytes: int = 2 * 2**30,
                 base_model: nn.Module | None = None):
        if host_budget_bytes <= 0:
            raise InvalidRequest(f"host_budget_bytes={host_budget_bytes} must be positive")
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise AdapterPathError(f"adapter root {str(root)!r} is not a folder; create it or pass another one")
        self.host_budget_bytes = int(host_budget_bytes)
        self.base_model = base_model
        self._registered: dict[str, Path] = {}
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._host_bytes = 0
        self._counts = {"hits": 0, "misses": 0, "loads": 0, "evictions": 0}
        self._lock = threading.RLock()

    # --- names -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Servable names: the root's sub-folders holding adapter_config.json, and registered ones."""
        with self._lock:
            found = set(self._registered)
        if self.root is not None:
            for entry in self.root.iterdir():
                if NAME_PATTERN.match(entry.name) and (entry / CONFIG_NAME).is_file() \
                        and entry.resolve().is_relative_to(self.root):
                    found.add(entry.name)
        return sorted(found)

    def __contains__(self, name) -> bool:
        if not isinstance(name, str):
            return False
        with self._lock:
            if name in self._registered:
                return True
        return self._folder_path(name) is not None

    # --- registration ------------------------------------------------------------------------
    def register(self, name: str, path: str | os.PathLike) -> None:
        """Serve the adapter in `path` as `name`, validated now (the folder is read and cached).

        AdapterPathError when `path` resolves outside the root; CorruptAdapter when it cannot be
        served; AdapterConflict when `name` already serves another folder (the same folder: no-op).
        """
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InvalidRequest(f"adapter name {name!r} is invalid: use 1-128 letters, digits, '_', '-', '.' or ':' "
                                 "(not starting with '.' or '-')")
        resolved = self._inside_root(path)
        with self._lock:
            current = self._registered.get(name)
            if current is None and self._folder_path(name) is not None:
                current = self._folder_path(name)
            if current is not None:
                if current == resolved:
                    return
                raise AdapterConflict(f"adapter {name!r} already serves {str(current)!r}; unload it first or pick another name")
            weights = self._load(name, resolved)
            self._registered[name] = resolved
            self._counts["misses"] += 1
            self._insert(weights)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._registered:
                if isinstance(name, str) and self._folder_path(name) is not None:
                    raise AdapterConflict(f"adapter {name!r} is a sub-folder of the adapter root, not a registered one; "
                                          "remove or rename that folder to stop serving it")
                raise UnknownAdapter(f"no adapter named {name!r} is registered")
            del self._registered[name]
            self._drop(name)

    # --- the cache ---------------------------------------------------------------------------
    def get(self, name: str) -> LoraWeights:
        """The adapter's weights: from the cache (a hit), else read from disk (a miss, a load)."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                self._counts["hits"] += 1
                return self._cache[name]
            path = self._registered.get(name) if isinstance(name, str) else None
            if path is None:
                path = self._folder_path(name) if isinstance(name, str) else None
            if path is None:
                raise UnknownAdapter(f"no adapter named {name!r}; servable adapters: {self._preview()}")
            self._counts["misses"] += 1
            weights = self._load(name, path)
            self._insert(weights)
            return weights

    @property
    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "host_bytes": self._host_bytes, "host_budget_bytes": self.host_budget_bytes,
                    "registered": len(self._registered), "cached": len(self._cache)}

    # --- internals -----------------------------------------------------------------------------
    def _load(self, name: str, path: Path) -> LoraWeights:
        weights = LoraWeights.from_folder(name, path, base_model=self.base_model)
        self._counts["loads"] += 1
        if weights.nbytes > self.host_budget_bytes:
            raise AdapterTooLarge(
                f"adapter {name!r} needs {weights.nbytes:,} bytes of host memory, more than the store's whole "
                f"budget ({self.host_budget_bytes:,} bytes); raise host_budget_bytes or serve a lower-rank export")
        return weights

    def _insert(self, weights: LoraWeights) -> None:
        self._drop(weights.name)
        self._cache[weights.name] = weights
        self._host_bytes += weights.nbytes
        while self._host_bytes > self.host_budget_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._host_bytes -= evicted.nbytes
            self._counts["evictions"] += 1

    def _drop(self, name: str) -> None:
        weights = self._cache.pop(name, None)
        if weights is not None:
            self._host_bytes -= weights.nbytes

    def _folder_path(self, name: str) -> Path | None:
        """root/name when it is an adapter folder (resolved; AdapterPathError if a link leads out)."""
        if self.root is None or not NAME_PATTERN.match(name):
            return None
        folder = self.root / name
        if not (folder / CONFIG_NAME).is_file():
            return None
        return self._inside_root(folder)

    def _inside_root(self, path: str | os.PathLike) -> Path:
        candidate = Path(path)
        if self.root is not None and not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise AdapterPathError(f"adapter path {str(path)!r} resolves outside the adapter root {str(self.root)!r}; "
                                   "copy the adapter into a folder under the root")
        return resolved

    def _preview(self) -> str:
        names = self.names()
        return ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "") if names else "none"
