"""The serving engine: continuous batching of requests that use different LoRA adapters on one base
model (S-LoRA, Sheng et al., arXiv 2311.03285).

One background thread runs the loop; each iteration

1. admits waiting requests into the running batch while the batch has room, the number of distinct
   adapters stays within `max_adapters_per_step`, and the unified pool (`serve.pool.UnifiedPool`) can
   hold the request's KV cells (prompt + max_tokens, reserved up front so a running request is never
   preempted) and, for an adapter not yet resident, the adapter's cells. Resident adapters that no
   running request uses are evicted, least recently used first, when cells are short — KV cache and
   adapters share one budget, as in the paper;
2. prefills the admitted requests as one left-padded batch, each row with its own adapter
   (`serve.lora_batch.MultiLoraModel.rows`), and joins their KV cache to the running one;
3. runs one decode step for every running request (one token each), samples per request
   (temperature, top-p, seed), streams text deltas, and retires requests that hit max_tokens, EOS or
   a stop string, or were cancelled — their rows leave the cache and their cells return to the pool.

The KV cache is transformers' `DynamicCache` with left padding: requests joining mid-flight are
padded on the left to the running length and the attention mask hides the padding; columns that
only hold padding are trimmed when requests leave. Positions come from the mask, so RoPE sees each
request's true positions. Only full-attention caches are supported (sliding-window layers keep a
window that left padding would shift); other models are refused at construction.

Requests are submitted from any thread (`submit`, validated synchronously: bad fields, unknown or
corrupt adapters and over-long prompts raise there, so a server answers 4xx before streaming) and
read back blocking (`result`, iteration) or from asyncio (`aresult`, `astream`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.serve.errors import InvalidRequest, PromptTooLong, ServeError, ShuttingDown, QueueFull, UnknownAdapter
from lorakit.serve.lora_batch import MultiLoraModel
from lorakit.serve.pool import UnifiedPool
from lorakit.serve.store import AdapterStore

DEFAULT_DEVICE_BUDGET = 2 * 2**30


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM names). temperature 0 is greedy;
    ignore_eos keeps generating past the end-of-sequence token (benchmarks use it)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest(f"stop must be non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


_FINISHED = object()


class RequestHandle:
    """A submitted request: stream its text as it is produced, wait for the result, or cancel it.
    Safe to read from any thread and from asyncio."""

    def __init__(self, request_id: str, adapter: str | None):
        self.id = request_id
        self.adapter = adapter
        self._lock = threading.Condition()
        self._chunks: list[str] = []
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._listeners: list = []
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    # --- engine side ---
    def _push(self, text: str) -> None:
        with self._lock:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if text:
                self._chunks.append(text)
            listeners = list(self._listeners)
            self._lock.notify_all()
        for notify in listeners:
            notify(text)

    def _finish(self, completion: Completion | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self._completion is not None or self._error is not None:
                return
            self._completion, self._error = completion, error
            self.finished_at = time.perf_counter()
            listeners = list(self._listeners)
            self._lock.notify_all()
        for notify in listeners:
            notify(_FINISHED)

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    # --- client side ---
    def cancel(self) -> None:
        self.cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        with self._lock:
            if not self._lock.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion

    def __iter__(self) -> Iterator[str]:
        sent = 0
        while True:
            with self._lock:
                self._lock.wait_for(lambda: len(self._chunks) > sent or self.done)
                new, finished = self._chunks[sent:], self.done  # chunks are pushed before finishing
            yield from new
            sent += len(new)
            if finished:
                if self._error is not None:
                    raise self._error
                return

    async def astream(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def notify(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        with self._lock:
            backlog = list(self._chunks)
            finished = self.done
            if not finished:
                self._listeners.append(notify)
        try:
            for chunk in backlog:
                yield chunk
            while not finished:
                item = await queue.get()
                if item is _FINISHED:
                    break
                if item:
                    yield item
            if self._error is not None:
                raise self._error
        finally:
            with self._lock:
                if notify in self._listeners:
                    self._listeners.remove(notify)

    async def aresult(self) -> Completion:
        async for _ in self.astream():
            pass
        return self.result()


@dataclass
class _Running:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None


class Engine:
    """Continuous-batching generation over a base model and an adapter store (see the module docstring).

    max_batch_size: most requests decoded together; max_adapters_per_step: most distinct adapters in
    the running batch; max_queue: waiting requests beyond which `submit` raises QueueFull;
    device_budget_bytes: the unified pool shared by the KV cache and resident adapters (default 2 GiB);
    mode: the batched-LoRA evaluation ("segment" or "bmm", see serve.lora_batch).
    """

    def __init__(self, model: nn.Module, tokenizer, store: AdapterStore, *, max_batch_size: int = 16,
                 max_adapters_per_step: int = 16, max_queue: int = 256, device_budget_bytes: int | None = None,
                 mode: str = "segment", model_name: str = "base"):
        for name, value in (("max_batch_size", max_batch_size), ("max_adapters_per_step", max_adapters_per_step),
                            ("max_queue", max_queue)):
            if value < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {value}")
        _require_full_attention(model)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_adapters_per_step = max_adapters_per_step
        self.max_queue = max_queue
        self.multi = MultiLoraModel(model, mode=mode)
        dtype = next(model.parameters()).dtype
        self.pool = UnifiedPool.for_model(model.config, device_budget_bytes or DEFAULT_DEVICE_BUDGET, dtype)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.device = next(model.parameters()).device
        # transformers 5 renamed the cache argument; 4.x only knows past_key_values
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos_ids) if self.eos_ids else 0)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[tuple[RequestHandle, list[int], SamplingParams]] = deque()
        self._running: list[_Running] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length) 1 = real token
        self._resident: OrderedDict[str, None] = OrderedDict()  # device-resident adapters, LRU order
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._drain_deadline: float | None = None
        self._token_times: deque[tuple[float, int]] = deque()
        self.counters = Counter()
        self.per_adapter_requests: Counter = Counter()
        self.last_error: BaseException | None = None

    # --- lifecycle ---
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._accepting = True
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting requests; graceful: finish what is running or queued within `timeout`
        seconds, then cancel the rest; otherwise cancel everything now."""
        self._accepting = False
        self._drain_deadline = time.monotonic() + (timeout if graceful else 0.0)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 30.0)
        self._cancel_all("cancelled")

    @property
    def alive(self) -> bool:
        """The loop is running and accepting requests."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- requests ---
    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidRequest("messages must be a list of {\"role\": ..., \"content\": ...} objects")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("the base model's tokenizer has no chat template; use /v1/completions with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def submit(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> RequestHandle:
        params = params or SamplingParams()
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if adapter in (None, "", self.model_name):
            adapter = None
        else:
            self.store.get(adapter)  # UnknownAdapter / CorruptAdapter now, not after streaming began
        ids = self._encode(prompt)
        if len(ids) + params.max_tokens > self.max_context:
            raise PromptTooLong(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of "
                f"{self.max_context} tokens; shorten the prompt or lower max_tokens"
            )
        needed = len(ids) + params.max_tokens
        if needed > self.pool.cells:
            raise PromptTooLong(
                f"prompt + max_tokens needs {needed} KV cells but the device budget holds {self.pool.cells}; "
                f"raise the device budget or shorten the request"
            )
        handle = RequestHandle(f"req-{next(self._ids)}", adapter)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append((handle, ids, params))
            self.counters["requests_total"] += 1
            self.per_adapter_requests[adapter or self.model_name] += 1
        self._wake.set()
        return handle

    def generate(self, prompt: str | list[int], adapter: str | None = None,
                 params: SamplingParams | None = None, timeout: float | None = None) -> Completion:
        return self.submit(prompt, adapter, params).result(timeout)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids")
        if not ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        return ids

    # --- observability ---
    def metrics(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            window = [(t, n) for t, n in self._token_times if now - t <= 10.0]
            waiting, running = len(self._waiting), len(self._running)
            per_adapter = dict(self.per_adapter_requests)
        span = (now - window[0][0]) if len(window) > 1 else 0.0
        stats = self.store.stats
        return {
            "queue_length": waiting,
            "running": running,
            "requests_total": self.counters["requests_total"],
            "requests_finished": self.counters["requests_finished"],
            "requests_failed": self.counters["requests_failed"],
            "rejected_queue_full": self.counters["rejected_queue_full"],
            "tokens_generated_total": self.counters["tokens_generated"],
            "tokens_per_second": (sum(n for _, n in window[1:]) / span) if span > 0 else 0.0,
            "adapter_hits": stats.get("hits", 0),
            "adapter_misses": stats.get("misses", 0),
            "adapter_evictions": stats.get("evictions", 0),
            "adapter_loads": stats.get("loads", 0),
            "host_bytes": stats.get("host_bytes", 0),
            "device_adapters": len(self._resident),
            "device_adapter_evictions": self.counters["device_evictions"],
            "pool_free_cells": self.pool.free_count,
            "pool_cells": self.pool.cells,
            "per_adapter_requests": per_adapter,
        }

    # --- the loop ---
    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not self._waiting and not self._running
            if self._drain_deadline is not None and (idle or time.monotonic() >= self._drain_deadline):
                return
            if idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as error:  # a failed step fails its requests, never the engine
                self.last_error = error
                self._fail_running(error)

    @torch.inference_mode()
    def _step(self) -> None:
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()

    def _admit(self) -> list[_Running]:
        admitted: list[_Running] = []
        with self._lock:
            adapters_in_use = {r.handle.adapter for r in self._running} - {None}
            kept: deque = deque()
            while self._waiting:
                handle, ids, params = self._waiting.popleft()
                if handle.cancelled:
                    handle._finish(Completion("", [], len(ids), 0, "cancelled"))
                    continue
                fits = (len(self._running) + len(admitted) < self.max_batch_size
                        and (handle.adapter is None or handle.adapter in adapters_in_use
                             or len(adapters_in_use) < self.max_adapters_per_step))
                if fits and self._reserve(handle, len(ids) + params.max_tokens, adapters_in_use):
                    if handle.adapter is not None:
                        adapters_in_use.add(handle.adapter)
                    admitted.append(_Running(handle, ids, params, _generator(params.seed)))
                else:
                    kept.append((handle, ids, params))
            self._waiting = kept
        return admitted

    def _reserve(self, handle: RequestHandle, kv_cells: int, adapters_in_use: set[str]) -> bool:
        """Pool cells for the request's KV cache and, if not resident, its adapter; evicts idle
        resident adapters (LRU) when short. False (and nothing held) when it cannot fit now."""
        name = handle.adapter
        if name is not None and name in self._resident:
            self._resident.move_to_end(name)
            name = None  # already resident
        adapter_cells = 0
        weights = None
        if name is not None:
            try:
                weights = self.store.get(name)
            except ServeError as error:  # unregistered or broken since submit
                handle._finish(error=error)
                self.counters["requests_failed"] += 1
                return True  # consumed (failed), not kept waiting
            adapter_cells = self.pool.cells_for_bytes(weights.nbytes)
        while self.pool.free_count < kv_cells + adapter_cells:
            idle = [a for a in self._resident if a not in adapters_in_use and a != handle.adapter]
            if not idle:
                return False
            self._evict(idle[0])
        if handle.done:
            return True
        if self.pool.alloc(kv_cells, owner=handle.id) is None:
            return False
        if weights is not None:
            if self.pool.alloc(adapter_cells, owner=f"adapter:{weights.name}") is None:
                self.pool.free(handle.id)
                return False
            self.multi.activate(weights)
            self._resident[weights.name] = None
            self.counters["device_loads"] += 1
        return True

    def _evict(self, name: str) -> None:
        self.multi.deactivate(name)
        self.pool.free(f"adapter:{name}")
        del self._resident[name]
        self.counters["device_evictions"] += 1

    def _prefill(self, admitted: list[_Running]) -> None:
        admitted = [r for r in admitted if not r.handle.done]
        if not admitted:
            return
        length = max(len(r.prompt) for r in admitted)
        ids = torch.full((len(admitted), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(admitted), length), dtype=torch.long)
        for row, request in enumerate(admitted):
            ids[row, length - len(request.prompt):] = torch.tensor(request.prompt)
            mask[row, length - len(request.prompt):] = 1
        cache = DynamicCache()
        try:
            logits = self._forward(ids, mask, cache, [r.handle.adapter for r in admitted])
        except Exception as error:
            for request in admitted:
                self._release(request)
                request.handle._finish(error=error)
                self.counters["requests_failed"] += 1
            self.last_error = error
            return
        self._join(cache, mask, admitted)
        self._advance(admitted, logits)

    def _decode(self) -> None:
        last = torch.tensor([[r.generated[-1]] for r in self._running], dtype=torch.long)
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=torch.long)], dim=1)
        logits = self._forward(last, self._mask, self._cache, [r.handle.adapter for r in self._running])
        self._advance(list(self._running), logits)

    def _forward(self, ids, mask, cache, adapters) -> torch.Tensor:
        """Last-position logits (rows, vocab) in fp32; the cache grows by ids' length."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with self.multi.rows(adapters):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), use_cache=True, logits_to_keep=1,
                             **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float().cpu()

    def _join(self, cache: DynamicCache, mask: torch.Tensor, admitted: list[_Running]) -> None:
        """Append the prefilled rows to the running batch, left-padding the shorter cache."""
        if not self._running:
            self._cache, self._mask = cache, mask
        else:
            old_len, new_len = self._mask.shape[1], mask.shape[1]
            width = max(old_len, new_len)
            for old_layer, new_layer in zip(self._cache.layers, cache.layers):
                old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)], dim=0)
                old_layer.values = torch.cat([_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)], dim=0)
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
        with self._lock:
            self._running.extend(admitted)

    def _advance(self, requests: list[_Running], logits: torch.Tensor) -> None:
        """Sample one token per request, stream it, retire the finished rows."""
        now = time.perf_counter()
        for request, row_logits in zip(requests, logits):
            token = _sample(row_logits, request.params, request.generator)
            request.generated.append(token)
            self._emit(request, token)
        with self._lock:
            self._token_times.append((now, len(requests)))
            while self._token_times and now - self._token_times[0][0] > 10.0:
                self._token_times.popleft()
        self.counters["tokens_generated"] += len(requests)
        self._retire()

    def _emit(self, request: _Running, token: int) -> None:
        params = request.params
        if token in self.eos_ids and not params.ignore_eos:
            request.generated.pop()
            request.finish_reason = "stop"
        else:
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            stop_at = _find_stop(text, params.stop, max(0, request.sent - max((len(s) for s in params.stop), default=0)))
            if stop_at is not None:
                request.text = text[:stop_at]
                request.finish_reason = "stop"
            else:
                request.text = text
                if len(request.generated) >= params.max_tokens:
                    request.finish_reason = "length"
        if request.handle.cancelled and request.finish_reason is None:
            request.finish_reason = "cancelled"
        safe = len(request.text) if request.finish_reason else _streamable(request.text, params.stop)
        if safe > request.sent:
            request.handle._push(request.text[request.sent:safe])
            request.sent = safe

    def _retire(self) -> None:
        for request in self._running:
            if request.handle.cancelled and request.finish_reason is None:
                request.finish_reason = "cancelled"
        keep = [i for i, r in enumerate(self._running) if r.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for request in self._running:
            if request.finish_reason is not None:
                self._release(request)
                request.handle._finish(Completion(request.text, list(request.generated), len(request.prompt),
                                                  len(request.generated), request.finish_reason))
                self.counters["requests_finished"] += 1
        with self._lock:
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask.index_select(0, index)
        first_real = int((mask.sum(0) > 0).long().argmax())  # trim columns that are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, first_real:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, first_real:]
        self._mask = mask[:, first_real:]

    def _release(self, request: _Running) -> None:
        self.pool.free(request.handle.id)

    def _fail_running(self, error: BaseException) -> None:
        with self._lock:
            running, self._running = self._running, []
        for request in running:
            self._release(request)
            request.handle._finish(error=error)
            self.counters["requests_failed"] += 1
        self._cache, self._mask = None, None

    def _cancel_all(self, reason: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            running, self._running = self._running, []
        for handle, ids, _ in waiting:
            handle._finish(Completion("", [], len(ids), 0, reason))
        for request in running:
            self._release(request)
            request.handle._finish(Completion(request.text, list(request.generated), len(request.prompt),
                                              len(request.generated), reason))
        self._cache, self._mask = None, None


# --- helpers ---------------------------------------------------------------------------------

def _require_full_attention(model: nn.Module) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if windowed or any(kind != "full_attention" for kind in layer_types):
        raise InvalidRequest(
            f"lorakit serve batches requests with a left-padded full-attention KV cache; {config.model_type} "
            f"has sliding-window layers. Serve it with vLLM (the adapters are PEFT format) or use a "
            f"full-attention model (Llama, SmolLM2, Qwen2)"
        )


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _streamable(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be streamed now: hold back an incomplete UTF-8 character and any suffix
    that could be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return end


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[:-2] + (missing, tensor.shape[-1]))
    return torch.cat([pad, tensor], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
