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

Isolation: one request never fails or wedges another. Every field is validated to the range the
sampler can take (`SamplingParams`); a row whose logits are not finite fails only its own request
(`NonFiniteLogits`); every request taken off the queue ends finished or failed, with its pool cells
freed, whatever raises where (a failed batched forward fails the requests in that forward only).
The loop beats a heartbeat every iteration and records when requests last made progress, so
`health()` tells a wedged step or a stalled queue from a busy engine; when nothing can be admitted
and nothing runs it sleeps on its wake event (set by submit, cancel and shutdown) instead of spinning.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import numbers
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.serve.errors import InvalidRequest, NonFiniteLogits, PromptTooLong, QueueFull, ShuttingDown
from lorakit.serve.lora_batch import MultiLoraModel
from lorakit.serve.pool import UnifiedPool
from lorakit.serve.store import AdapterStore

log = logging.getLogger("lorakit.serve")

DEFAULT_DEVICE_BUDGET = 2 * 2**30
MAX_TEMPERATURE = 100.0
GREEDY_BELOW_TEMPERATURE = 1e-5  # vLLM's epsilon: below it, sampling is greedy (the T -> 0 limit)
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed takes; a negative s seeds as s + 2**64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
PROMPT_CHARS_PER_TOKEN = 32  # the default character limit per token of context: no tokenizer packs more
DEFAULT_STALL_TIMEOUT = 30.0
IDLE_WAIT = 0.25  # longest sleep of a loop that has nothing to do (a wake event ends it sooner)


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI / vLLM names), validated on construction to the
    ranges the sampler takes safely (InvalidRequest names the field otherwise):

    - max_tokens: an integer >= 1 (prompt + max_tokens must also fit the context, checked at submit);
    - temperature: a finite number in [0, 100]; below 1e-5 (0 included) decoding is greedy, which
      is the limit of sampling as the temperature goes to 0 and keeps fp32 from overflowing;
    - top_p: a finite number in (0, 1]; the most likely token is always kept, so a tiny top_p means
      greedy rather than an empty distribution;
    - seed: None, or an integer in [-2**63, 2**64) (what torch's generator takes; a negative seed s
      gives the same samples as s + 2**64);
    - stop: at most 16 non-empty strings of at most 1024 characters each;
    - ignore_eos: keep generating past the end-of-sequence token (benchmarks use it).

    Booleans are refused where a number is expected, and text must be valid Unicode (no lone
    surrogates)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, (list, tuple)) and self.stop is not None:
            raise InvalidRequest(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        self.stop = tuple(self.stop or ())
        if not _is_integer(self.max_tokens) or self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.temperature = _finite("temperature", self.temperature)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        self.top_p = _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_integer(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise InvalidRequest(f"seed must be an integer in [-2**63, 2**64) or null, got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop holds {len(self.stop)} strings; send at most {MAX_STOP_STRINGS}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidRequest(f"stop must be non-empty strings of at most {MAX_STOP_CHARS} characters, "
                                     f"got {stop!r:.80}")
            require_text(stop, "stop")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def require_text(text: str, field_name: str) -> None:
    """Refuse a string the tokenizer cannot take: lone surrogates (JSON's "\\ud800") are not Unicode text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(f"{field_name} holds a lone surrogate ({text[error.start]!a}) at character {error.start}, "
                             "which is not valid Unicode text; send UTF-8 text (pair surrogates, or drop them)") from None


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
    return float(value)


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

    def __init__(self, request_id: str, adapter: str | None, on_cancel=None):
        self.id = request_id
        self.adapter = adapter
        self._on_cancel = on_cancel  # wakes the engine's loop, which may be asleep
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
        if self._on_cancel is not None and not self.done:
            self._on_cancel()

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
    finish_reason: str | None = None  # "error": `error` fails the request when it retires
    error: BaseException | None = None


class Engine:
    """Continuous-batching generation over a base model and an adapter store (see the module docstring).

    max_batch_size: most requests decoded together; max_adapters_per_step: most distinct adapters in
    the running batch; max_queue: waiting requests beyond which `submit` raises QueueFull;
    device_budget_bytes: the unified pool shared by the KV cache and resident adapters (default 2 GiB);
    mode: the batched-LoRA evaluation ("segment" or "bmm", see serve.lora_batch);
    max_prompt_chars: the longest prompt, in characters, taken to the tokenizer (default 32 per token
    of the model's context; chat messages count their roles and contents together);
    stall_timeout: seconds without a loop iteration, or without progress while requests wait or
    run, after which `health()` reports the engine unavailable (default 30).
    """

    def __init__(self, model: nn.Module, tokenizer, store: AdapterStore, *, max_batch_size: int = 16,
                 max_adapters_per_step: int = 16, max_queue: int = 256, device_budget_bytes: int | None = None,
                 mode: str = "segment", model_name: str = "base", max_prompt_chars: int | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT):
        for name, value in (("max_batch_size", max_batch_size), ("max_adapters_per_step", max_adapters_per_step),
                            ("max_queue", max_queue)):
            if value < 1:
                raise InvalidRequest(f"{name} must be >= 1, got {value}")
        if not stall_timeout > 0:
            raise InvalidRequest(f"stall_timeout must be > 0 seconds, got {stall_timeout}")
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
        self.max_prompt_chars = int(max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.max_context)
        if self.max_prompt_chars < 1:
            raise InvalidRequest(f"max_prompt_chars must be >= 1, got {max_prompt_chars}")
        self.stall_timeout = float(stall_timeout)
        self.device = next(model.parameters()).device
        # transformers 5 renamed the cache argument; 4.x only knows past_key_values
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos_ids) if self.eos_ids else 0)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[_Running] = deque()
        self._admitting: list[_Running] = []  # taken off the queue, holding cells, not yet in the batch
        self._running: list[_Running] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (rows, cache length) 1 = real token
        self._resident: OrderedDict[str, None] = OrderedDict()  # device-resident adapters, LRU order
        self._unloaded: set[str] = set()  # forget_adapter() names whose resident copy is still to be dropped
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._drain_deadline: float | None = None
        self._died: BaseException | None = None
        self._heartbeat_at = self._progress_at = time.monotonic()
        self._token_times: deque[tuple[float, int]] = deque()
        self.counters = Counter()
        self.per_adapter_requests: Counter = Counter()
        self.last_error: BaseException | None = None

    # --- lifecycle ---
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._accepting = True
            self._died = None
            self._heartbeat_at = self._progress_at = time.monotonic()
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

    def wake(self) -> None:
        """Make a sleeping loop look at its queue now (pool cells or adapters were freed elsewhere)."""
        self._wake.set()

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
        chars = 0
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                value = message[key]
                if value is None and key == "content":
                    continue
                if not isinstance(value, str):
                    raise InvalidRequest(f"messages[{i}].{key} must be a string, got {type(value).__name__}")
                require_text(value, f"messages[{i}].{key}")
                chars += len(value)
        self._check_prompt_chars(chars, "the messages' roles and contents")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def submit(self, prompt: str | list[int], adapter: str | None = None,
               params: SamplingParams | None = None) -> RequestHandle:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        if self._died is not None:
            raise ShuttingDown(f"the engine loop has died ({type(self._died).__name__}: {self._died}); restart the server")
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
        handle = RequestHandle(f"req-{next(self._ids)}", adapter, on_cancel=self._wake.set)
        request = _Running(handle, ids, params, _generator(params.seed))  # seeded here: nothing raises in the loop
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(request)
            self.counters["requests_total"] += 1
            self.per_adapter_requests[adapter or self.model_name] += 1
        self._wake.set()
        return handle

    def generate(self, prompt: str | list[int], adapter: str | None = None,
                 params: SamplingParams | None = None, timeout: float | None = None) -> Completion:
        return self.submit(prompt, adapter, params).result(timeout)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "the prompt")  # before tokenizing: its memory grows with the text
            require_text(prompt, "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            if len(prompt) > self.max_context:  # before looking at each id
                raise PromptTooLong(f"prompt has {len(prompt)} token ids; the model's context is {self.max_context} tokens")
            if not all(_is_integer(t) for t in prompt):
                raise InvalidRequest("prompt must be a string or a list of token ids")
            ids = [int(t) for t in prompt]
        else:
            raise InvalidRequest("prompt must be a string or a list of token ids")
        if not ids:
            raise InvalidRequest("prompt is empty")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        return ids

    def _check_prompt_chars(self, chars: int, what: str) -> None:
        if chars > self.max_prompt_chars:
            raise PromptTooLong(f"{what} holds {chars} characters, over the limit of {self.max_prompt_chars} "
                                f"(max_prompt_chars; --max-prompt-chars for lorakit serve); shorten it")

    # --- observability ---
    def metrics(self) -> dict:
        now = time.perf_counter()
        with self._lock:
            window = [(t, n) for t, n in self._token_times if now - t <= 10.0]
            waiting, running = len(self._waiting), len(self._running)
            per_adapter = dict(self.per_adapter_requests)
        span = (now - window[0][0]) if len(window) > 1 else 0.0
        stats = self.store.stats
        owners = self.pool.owners()
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
            "pool_adapter_cells": sum(n for owner, n in owners.items() if owner.startswith("adapter:")),
            "pool_request_cells": sum(n for owner, n in owners.items() if owner.startswith("req-")),
            "heartbeat_age_seconds": time.monotonic() - self._heartbeat_at,
            "loop_iterations": self.counters["loop_iterations"],
            "per_adapter_requests": per_adapter,
        }

    def health(self) -> dict:
        """Whether the loop serves: {"status": "ok" | "unavailable", "reason" (when unavailable),
        "heartbeat_age_s", "progress_age_s", "queue_length", "running"}. Unavailable when the loop is
        not running (not started, stopped, died, shutting down), when it has not completed an
        iteration for `stall_timeout` seconds while it has work (a wedged step), or when requests
        wait or run but none made progress for that long (a stalled queue)."""
        now = time.monotonic()
        with self._lock:
            waiting, running = len(self._waiting), len(self._running) + len(self._admitting)
        beat, progress = now - self._heartbeat_at, now - self._progress_at
        busy = waiting or running
        thread = self._thread
        if self._died is not None:
            reason = f"the engine loop died: {type(self._died).__name__}: {self._died}"
        elif thread is None:
            reason = "the engine loop is not started"
        elif not thread.is_alive():
            reason = "the engine loop has stopped"
        elif not self._accepting:
            reason = "the engine is shutting down"
        elif busy and beat > self.stall_timeout:
            reason = (f"wedged: the engine loop has not completed an iteration for {beat:.1f} s (stall timeout "
                      f"{self.stall_timeout:g} s) with {running} running and {waiting} waiting")
        elif busy and progress > self.stall_timeout:
            reason = (f"stalled: no request made progress for {progress:.1f} s (stall timeout {self.stall_timeout:g} s); "
                      f"{waiting} waiting, {running} running, {self.pool.free_count} of {self.pool.cells} pool cells free")
        else:
            reason = None
        report = {"status": "ok" if reason is None else "unavailable", "heartbeat_age_s": round(beat, 3),
                  "progress_age_s": round(progress, 3), "queue_length": waiting, "running": running}
        if reason is not None:
            report["reason"] = reason
        return report

    # --- the loop ---
    def _loop(self) -> None:
        try:
            while True:
                self._heartbeat_at = time.monotonic()
                self.counters["loop_iterations"] += 1
                self._wake.clear()  # a submit or cancel from here on ends the wait below
                if self._unloaded:
                    try:
                        self._drop_unloaded({r.handle.adapter for r in self._running + self._admitting})
                    except Exception as error:  # an eviction that failed must not end the loop
                        self.last_error = error
                with self._lock:
                    idle = not self._waiting and not self._running
                if self._drain_deadline is not None and (idle or time.monotonic() >= self._drain_deadline):
                    return
                if idle:
                    self._progress_at = time.monotonic()  # nothing to do is not a stall
                    self._wake.wait(IDLE_WAIT)
                    continue
                try:
                    progressed = self._step()
                except Exception as error:  # a failed step fails the requests it held, never the engine
                    self.last_error = error
                    self._fail_taken(error)
                    progressed = True
                if progressed:
                    self._progress_at = time.monotonic()
                else:  # requests wait that cannot be admitted, and nothing runs: sleep, do not spin
                    self._wake.wait(IDLE_WAIT)
        except BaseException as error:  # the thread ends: no client may wait on it forever
            self._died = error
            self._accepting = False
            failure = ShuttingDown(f"the engine loop died ({type(error).__name__}: {error}); restart the server")
            self._fail_taken(failure)
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
            for request in waiting:
                self._fail(request, failure)
            log.critical("lorakit serve: the engine loop died; every request failed and /health answers 503",
                         exc_info=error)

    @torch.inference_mode()
    def _step(self) -> bool:
        """One admission, prefill and decode round; False when nothing moved (nothing admitted or
        ended, nothing running)."""
        admitted, moved = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._running:
            self._decode()
            return True
        return moved

    def _admit(self) -> tuple[list[_Running], bool]:
        """Take the waiting requests that fit into `_admitting` (holding their cells); the cancelled
        ones end, and the ones that fail here (adapter broken since submit, too large for the pool,
        an error activating it) end with that error and their cells freed. Returns the admitted
        requests and whether any request left the queue. The engine lock is held only to read and
        update the queue, never while an adapter is read from disk."""
        with self._lock:
            waiting = list(self._waiting)
            adapters_in_use = {r.handle.adapter for r in self._running} - {None}
            room = self.max_batch_size - len(self._running)
        taken: set[int] = set()
        for request in waiting:
            handle = request.handle
            if handle.done:  # ended elsewhere (shutdown)
                taken.add(id(request))
                continue
            if handle.cancelled:
                handle._finish(Completion("", [], len(request.prompt), 0, "cancelled"))
                taken.add(id(request))
                continue
            if len(self._admitting) >= room or (handle.adapter is not None and handle.adapter not in adapters_in_use
                                                and len(adapters_in_use) >= self.max_adapters_per_step):
                continue
            try:
                reserved = self._reserve(request, adapters_in_use)
            except Exception as error:
                taken.add(id(request))
                self._fail(request, error)
                continue
            if reserved:
                taken.add(id(request))
                self._admitting.append(request)
                if handle.adapter is not None:
                    adapters_in_use.add(handle.adapter)
        if taken:
            with self._lock:
                self._waiting = deque(r for r in self._waiting if id(r) not in taken)
        return list(self._admitting), bool(taken)

    def _reserve(self, request: _Running, adapters_in_use: set[str]) -> bool:
        """Pool cells for the request's KV cache and, if not resident, its adapter; evicts idle
        resident adapters (LRU) when short. False (and nothing held) when it cannot fit now; raises
        (nothing held) when it never can or its adapter cannot be served."""
        handle = request.handle
        kv_cells = len(request.prompt) + request.params.max_tokens
        name = handle.adapter
        if name is not None and name in self._unloaded:
            if name in adapters_in_use:
                return False  # its unloaded weights still serve running requests: wait until they finish
            self._drop_unloaded(adapters_in_use)
        if name is not None and name in self._resident:
            self._resident.move_to_end(name)
            name = None  # already resident
        adapter_cells = 0
        weights = None
        if name is not None:
            weights = self.store.get(name)  # ServeError if unregistered or broken since submit
            adapter_cells = self.pool.cells_for_bytes(weights.nbytes)
            if kv_cells + adapter_cells > self.pool.cells:
                raise PromptTooLong(
                    f"the request needs {kv_cells} KV cells and adapter {name!r} {adapter_cells} more, over the "
                    f"device pool's {self.pool.cells} cells; raise the device budget or shorten the request")
        # the host budget counts resident adapters kept in host memory (a CPU engine's, see AdapterStore)
        while self.pool.free_count < kv_cells + adapter_cells or (weights is not None and not self.multi.fits_host_budget(weights)):
            idle = [a for a in self._resident if a not in adapters_in_use and a != handle.adapter]
            if not idle:
                return False
            self._evict(idle[0])
        if self.pool.alloc(kv_cells, owner=handle.id) is None:
            return False
        if weights is not None:
            owner = f"adapter:{weights.name}"
            if self.pool.alloc(adapter_cells, owner=owner) is None:
                self.pool.free(handle.id)
                return False
            try:
                self.multi.activate(weights)
            except BaseException:
                self.pool.free(owner)
                self.pool.free(handle.id)
                raise
            self._resident[weights.name] = None
            self.counters["device_loads"] += 1
        return True

    def forget_adapter(self, name: str) -> None:
        """Drop the resident copy of adapter `name`, after `store.unregister(name)`, so that a reload
        under that name serves the new weights. Requests already running with it finish with the
        weights they started with; a request admitted later gets what the store serves then (it waits
        while the old ones run); its pool cells are freed. Any thread; done at the loop's next step."""
        with self._lock:
            self._unloaded.add(name)
        self._wake.set()

    def _drop_unloaded(self, in_use: set) -> None:
        """(loop thread) Evict the unloaded adapters that no running request uses."""
        with self._lock:
            done = {name for name in self._unloaded if name not in in_use}
            self._unloaded -= done
        for name in done:
            if name in self._resident:
                self._evict(name)

    def _evict(self, name: str) -> None:
        self.multi.deactivate(name)
        self.pool.free(f"adapter:{name}")
        del self._resident[name]
        self.counters["device_evictions"] += 1

    def _prefill(self, admitted: list[_Running]) -> None:
        """Prefill the admitted rows and join them to the running batch; if that fails, only they fail."""
        try:
            ready = [r for r in admitted if not r.handle.done]
            for request in admitted:
                if request.handle.done:
                    self._release(request)
            if not ready:
                self._admitting = []
                return
            length = max(len(r.prompt) for r in ready)
            ids = torch.full((len(ready), length), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(ready), length), dtype=torch.long)
            for row, request in enumerate(ready):
                ids[row, length - len(request.prompt):] = torch.tensor(request.prompt)
                mask[row, length - len(request.prompt):] = 1
            cache = DynamicCache()
            logits = self._forward(ids, mask, cache, [r.handle.adapter for r in ready])
            self._join(cache, mask, ready)
        except Exception as error:
            self.last_error = error
            self._admitting = []
            for request in admitted:
                self._fail(request, error)
            return
        self._admitting = []  # joined: the running batch holds them now (a BaseException leaves them to the loop's handler)
        self._advance(ready, logits)

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
        """Append the prefilled rows to the running batch, left-padding the shorter cache. All or
        nothing: the running cache changes only once every joined tensor exists."""
        if not self._running:
            self._cache, self._mask = cache, mask
        else:
            old_len, new_len = self._mask.shape[1], mask.shape[1]
            width = max(old_len, new_len)
            joined = [(torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0),
                       torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0))
                      for old, new in zip(self._cache.layers, cache.layers)]
            joined_mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)
            for layer, (keys, values) in zip(self._cache.layers, joined):
                layer.keys, layer.values = keys, values
            self._mask = joined_mask
        with self._lock:
            self._running.extend(admitted)

    def _advance(self, requests: list[_Running], logits: torch.Tensor) -> None:
        """Sample one token per request, stream it, retire the finished rows. A row that cannot be
        sampled (non-finite logits) ends with its error; the other rows are not touched."""
        now = time.perf_counter()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        sampled = 0
        for request, row_logits, row_finite in zip(requests, logits, finite):
            try:
                if not row_finite:
                    raise NonFiniteLogits(
                        f"{_model_label(request.handle.adapter)} produced non-finite logits (inf or NaN) at token "
                        f"{len(request.generated) + 1} of this request, so nothing can be sampled; the adapter's "
                        "weights are probably too large (or the model's dtype overflows): check or retrain the adapter")
                token = _sample(row_logits, request.params, request.generator)
                request.generated.append(token)
                sampled += 1
                self._emit(request, token)
            except Exception as error:
                request.finish_reason, request.error = "error", error
        with self._lock:
            self._token_times.append((now, sampled))
            while self._token_times and now - self._token_times[0][0] > 10.0:
                self._token_times.popleft()
        self.counters["tokens_generated"] += sampled
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
        if keep:  # shrink the cache before anything is released: if this fails, the batch is intact
            index = torch.tensor(keep, dtype=torch.long)
            mask = self._mask.index_select(0, index)
            first_real = int((mask.sum(0) > 0).long().argmax())  # trim columns that are padding in every row
            layers = [(layer.keys.index_select(0, index.to(layer.keys.device))[:, :, first_real:],
                       layer.values.index_select(0, index.to(layer.values.device))[:, :, first_real:])
                      for layer in self._cache.layers]
        leaving = [r for r in self._running if r.finish_reason is not None]
        with self._lock:
            self._running = [self._running[i] for i in keep]
        if keep:
            for layer, (keys, values) in zip(self._cache.layers, layers):
                layer.keys, layer.values = keys, values
            self._mask = mask[:, first_real:]
        else:
            self._cache, self._mask = None, None
        for request in leaving:
            if request.error is not None:
                self._fail(request, request.error)
            else:
                self._release(request)
                request.handle._finish(Completion(request.text, list(request.generated), len(request.prompt),
                                                  len(request.generated), request.finish_reason))
                self.counters["requests_finished"] += 1

    def _release(self, request: _Running) -> None:
        self.pool.free(request.handle.id)

    def _fail(self, request: _Running, error: BaseException) -> None:
        """End one request with `error` and give back its cells (nothing happens twice)."""
        self._release(request)
        if not request.handle.done:
            request.handle._finish(error=error)
            self.counters["requests_failed"] += 1

    def _fail_taken(self, error: BaseException) -> None:
        """Fail every request taken off the queue (admitting or running): the batch state is unknown."""
        with self._lock:
            taken = self._admitting + self._running
            self._admitting, self._running = [], []
        for request in taken:
            self._fail(request, error)
        self._cache, self._mask = None, None

    def _cancel_all(self, reason: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            taken = self._admitting + self._running
            self._admitting, self._running = [], []
        for request in waiting:
            request.handle._finish(Completion("", [], len(request.prompt), 0, reason))
        for request in taken:
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
    generator.manual_seed(int(seed))  # SamplingParams keeps seed in the range this takes
    return generator


def _model_label(adapter: str | None) -> str:
    return "the base model" if adapter is None else f"adapter {adapter!r}"


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from finite logits. Shifting by the maximum first keeps (logits - max) / T in
    [-inf, 0] for any temperature >= 1e-5, so the softmax never sees inf - inf; the most likely token
    always survives top-p, so the distribution is never empty."""
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keep the smallest prefix reaching top_p
        outside[0] = False
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
            if text.endswith(stop[:k], 0, end):
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
