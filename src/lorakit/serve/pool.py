"""S-LoRA's unified memory pool (Sheng et al., arXiv 2311.03285, section 4), at cell granularity.

One pool of P cells holds both kinds of serving state, so neither fragments the other:

- the KV cache: every token of every running request owns one cell (its keys and values in every
  layer, at the same cell index);
- adapter weights: an adapter of `nbytes` bytes owns `cells_for_bytes(nbytes)` cells.

A bitmap marks free cells. `alloc(n, owner)` takes the FIRST n free cells, contiguous or not (a
cumulative sum over the bitmap, as `slora/common/mem_manager.py`), and returns None when n exceeds
the free count instead of raising; `free(owner)` gives back every cell of that owner. Allocation
never needs a contiguous run, which is what makes the pool immune to the fragmentation that
variable-length requests and variable-rank adapters cause (`alloc_contiguous` exists to show the
contrast, and as the optional fast path of the paper).

This class is the accounting only: which cell belongs to whom. The engine uses it to decide what
fits (a request is admitted when its KV cells and any new adapter's cells fit). Deviation from
S-LoRA's layout (the spec says so): S-LoRA's cell is one hidden-size vector per layer, which fits
the q/k/v/o factors of an MHA Llama exactly; with GQA and MLP targets the factor widths differ, so
here a cell is a byte quantum (one token's K+V over all layers, see `for_model`) and an adapter
occupies enough cells to hold its bytes.
"""

from __future__ import annotations

import math
import threading

import torch

from lorakit.core.errors import ConfigError


class UnifiedPool:
    """A bitmap allocator over `cells` cells of `cell_bytes` bytes each; thread-safe."""

    def __init__(self, cells: int, cell_bytes: int):
        if not isinstance(cells, int) or cells < 0:
            raise ConfigError(f"cells={cells!r} must be a non-negative integer")
        if not isinstance(cell_bytes, int) or cell_bytes <= 0:
            raise ConfigError(f"cell_bytes={cell_bytes!r} must be a positive integer")
        self.cells = cells
        self.cell_bytes = cell_bytes
        self._free = torch.ones(cells, dtype=torch.bool)  # the bitmap: True = free
        self._owned: dict[str, torch.Tensor] = {}
        self._free_total = cells  # kept with the bitmap so the engine's admission checks are O(1)
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model_config, budget_bytes: int, dtype: torch.dtype) -> "UnifiedPool":
        """A pool of `budget_bytes` for a HF model config: one cell = the K and V of one token over
        all layers, 2 * num_layers * num_kv_heads * head_dim * itemsize bytes."""
        layers = model_config.num_hidden_layers
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        itemsize = torch.empty((), dtype=dtype).element_size()
        cell_bytes = 2 * layers * kv_heads * head_dim * itemsize
        if budget_bytes < cell_bytes:
            raise ConfigError(f"budget_bytes={budget_bytes} holds no cell ({cell_bytes} bytes: one token's K and V "
                              "over all layers); give the pool more memory")
        return cls(int(budget_bytes // cell_bytes), cell_bytes)

    @property
    def free_count(self) -> int:
        with self._lock:
            return self._free_total

    def cells_for_bytes(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.cell_bytes)

    def alloc(self, n: int, owner: str) -> torch.Tensor | None:
        """The first `n` free cells (ascending, not necessarily contiguous), now held by `owner`
        (added to what it already holds, as a KV cache grows a token at a time); None if n > free."""
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"alloc(n={n!r}): n must be a non-negative integer")
        with self._lock:
            if n > self._free_total:
                return None
            cells = self._free.nonzero().squeeze(1)[:n].clone()
            self._take(cells, owner)
            return cells

    def alloc_contiguous(self, n: int, owner: str) -> torch.Tensor | None:
        """The first run of `n` consecutive free cells, or None when no run is that long (even if
        n free cells exist): what an allocator without paging can do."""
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"alloc_contiguous(n={n!r}): n must be a non-negative integer")
        with self._lock:
            start = self._first_run(n)
            if start is None:
                return None
            cells = torch.arange(start, start + n)
            self._take(cells, owner)
            return cells

    def free(self, owner: str) -> None:
        """Give back every cell `owner` holds (nothing happens for an owner holding none)."""
        with self._lock:
            cells = self._owned.pop(owner, None)
            if cells is not None:
                self._free[cells] = True
                self._free_total += int(cells.numel())

    def owners(self) -> dict[str, int]:
        with self._lock:
            return {owner: int(cells.numel()) for owner, cells in self._owned.items()}

    def cells_of(self, owner: str) -> torch.Tensor:
        """The cells `owner` holds, in allocation order (empty if none)."""
        with self._lock:
            return self._owned.get(owner, torch.empty(0, dtype=torch.long)).clone()

    def longest_free_run(self) -> int:
        with self._lock:
            best = run = 0
            for free in self._free.tolist():
                run = run + 1 if free else 0
                best = max(best, run)
            return best

    # --- internals (lock held) ---------------------------------------------------------------
    def _take(self, cells: torch.Tensor, owner: str) -> None:
        self._free[cells] = False
        self._free_total -= int(cells.numel())
        held = self._owned.get(owner)
        self._owned[owner] = cells if held is None else torch.cat([held, cells])

    def _first_run(self, n: int) -> int | None:
        if n == 0:
            return 0
        run = 0
        for i, free in enumerate(self._free.tolist()):
            run = run + 1 if free else 0
            if run == n:
                return i - n + 1
        return None
