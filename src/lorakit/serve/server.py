"""OpenAI-compatible HTTP server over an `Engine` (FastAPI + uvicorn): `lorakit serve`.

Routes (the same paths and bodies as vLLM's OpenAI server, so clients and scripts work unchanged):

- `POST /v1/completions`, `POST /v1/chat/completions`: the `model` field names an adapter (a
  sub-folder of the adapter root, or one added by `load_lora_adapter`) or the base model's name;
  `"stream": true` answers with server-sent events in OpenAI's chunk format, ending `data: [DONE]`.
- `GET /v1/models`: the base model, then every servable adapter with `"parent"` = the base (as vLLM
  lists them); folders known not to load are left out (and logged on the server), see `AdapterStore.names`.
- `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` (a path inside the adapter root; without
  one, refused with 403 unless the server runs with `--allow-any-adapter-path`),
  `POST /v1/unload_lora_adapter` `{"lora_name"}` (drops every copy: a reload serves the new weights).
- `GET /health`: 200 `{"status": "ok", ...}`, or 503 with a `reason` when the engine loop is not
  running, is wedged in a step, or has work but makes no progress (`Engine.health`); both carry the
  heartbeat age, queue length and running count. `GET /metrics` (Prometheus text format, one
  registry per app).

Input limits (each refused with OpenAI's error body): a body over `max_body_bytes` (413, checked on
Content-Length and on the bytes of a chunked body), a body not fully received `body_timeout`
seconds after the request began (408), text that is not valid Unicode (lone surrogates) or a body
that is not UTF-8 JSON (400), and prompts over the engine's `max_prompt_chars` (400, before
tokenizing).

Every refused request is a 4xx (5xx only for a server fault) with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`, where `code` is the HTTP status as vLLM sends it;
the status and type come from `ServeError` (serve/errors.py). A request whose client disconnects
is cancelled in the engine, so it stops taking a batch slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve.engine import SamplingParams
from lorakit.serve.errors import InvalidRequest, RequestTimeout, RequestTooLarge, ServeError

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
DEFAULT_BODY_TIMEOUT = 30.0

# ---------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are accepted and ignored (OpenAI clients send many); fields we
# cannot honour (n > 1, echo, logprobs) are refused by name rather than silently ignored.
# ---------------------------------------------------------------------------------------------

Prompt = Union[str, list[int], list[str], list[list[int]]]


_HOLDS_TEXT = frozenset((str, dict, list))


class _TextBody(BaseModel):
    """A body whose every string (keys included) is valid Unicode: JSON can spell lone surrogates
    ("\\ud800"), which no tokenizer, file system or log takes."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data):
        pending = [((), data)]
        while pending:  # iterative: a deeply nested body cannot exhaust the stack
            path, value = pending.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as error:
                    where = ".".join(map(str, path)) or "body"
                    raise PydanticCustomError(
                        "lone_surrogate", "field '{field}' holds a lone surrogate at character {at}, which is not valid "
                        "Unicode text; send UTF-8 text", {"field": where, "at": error.start}) from None
            elif isinstance(value, dict):
                pending.extend((path + (key,), key) for key in value)
                pending.extend((path + (key,), item) for key, item in value.items() if type(item) in _HOLDS_TEXT)
            elif isinstance(value, list) and not _HOLDS_TEXT.isdisjoint(map(type, value)):  # token-id lists: skipped at C speed
                pending.extend((path + (i,), item) for i, item in enumerate(value) if type(item) in _HOLDS_TEXT)
        return data


class _Body(_TextBody):
    model_config = ConfigDict(extra="allow")

    model: str | None = None              # adapter name or the base model's name; None: the base
    max_tokens: int | None = None         # None: 16
    temperature: float | None = None      # None: 1.0, OpenAI's default (send 0 for greedy decoding)
    top_p: float | None = None            # None: 1.0
    n: int | None = None                  # only 1
    stream: bool | None = False
    stream_options: dict | None = None    # {"include_usage": true}: a last chunk with the usage
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None
    ignore_eos: bool = False              # vLLM's extra: keep generating past the end-of-sequence token

    @field_validator("max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", mode="before",
                     check_fields=False)
    @classmethod
    def _numbers_are_not_booleans(cls, value):
        if isinstance(value, bool):  # pydantic would read true as 1
            raise PydanticCustomError("bool_not_number", "expected a number, got {value}", {"value": str(value).lower()})
        return value


class CompletionBody(_Body):
    prompt: Prompt
    echo: bool = False


class ChatBody(_Body):
    messages: list[dict]
    max_completion_tokens: int | None = None   # the newer OpenAI name of max_tokens


class LoadLoraBody(_TextBody):
    lora_name: str
    lora_path: str


class UnloadLoraBody(_TextBody):
    model_config = ConfigDict(extra="allow")

    lora_name: str


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def _error_body(status: int, message: str, error_type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def _error(status: int, message: str, error_type: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, error_type, param), status_code=status)


def _failure_body(error: BaseException) -> dict:
    """A refused request (ServeError: its own status) or a failed generation (500)."""
    if isinstance(error, ServeError):
        return _error_body(error.status, str(error), error.error_type)
    return _error_body(500, f"generation failed: {type(error).__name__}: {error}", "server_error")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list (malformed JSON is its own case)."""
    first = errors[0] if errors else {}
    if first.get("type") == "lone_surrogate":
        return first["msg"], str((first.get("ctx") or {}).get("field", "")).split(".")[0] or None
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "not valid JSON")
        return f"malformed JSON body: {reason}; send one JSON object (Content-Type: application/json)", None
    parts, param = [], None
    for error in errors[:3]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        field = ".".join(loc)
        param = param or (loc[0] if loc else None)
        # A union (prompt) reports one error per alternative: name the field and the allowed forms once.
        if loc and loc[0] == "prompt":
            return "field 'prompt': expected a string, a list of token ids, a list of strings or a list of token-id lists", "prompt"
        parts.append(f"field '{field}': {error.get('msg')}" if field else f"request body: {error.get('msg')}")
    return "; ".join(parts), param


# ---------------------------------------------------------------------------------------------
# Metrics: read from engine.metrics() at scrape time, so the engine keeps the only copy of its counts.
# ---------------------------------------------------------------------------------------------

class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine

    def describe(self):  # no scrape at registration time
        return []

    def collect(self):
        m = self.engine.metrics()
        gauges = (("queue_length", "lorakit_queue_length", "Requests waiting for a batch slot"),
                  ("running", "lorakit_running_requests", "Requests in the running batch"),
                  ("tokens_per_second", "lorakit_tokens_per_second", "Generated tokens per second (recent)"),
                  ("device_adapters", "lorakit_device_adapters", "Adapters resident in device memory"),
                  ("pool_free_cells", "lorakit_pool_free_cells", "Free cells of the unified device pool (KV cache and adapters)"),
                  ("pool_cells", "lorakit_pool_cells", "Cells of the unified device pool"),
                  ("pool_request_cells", "lorakit_pool_request_cells", "Pool cells held by requests (KV cache)"),
                  ("pool_adapter_cells", "lorakit_pool_adapter_cells", "Pool cells held by resident adapters"),
                  ("heartbeat_age_seconds", "lorakit_engine_heartbeat_age_seconds",
                   "Seconds since the engine loop last began an iteration"))
        for key, name, text in gauges:
            yield GaugeMetricFamily(name, text, value=float(m[key]))
        yield GaugeMetricFamily("lorakit_adapter_cache_bytes", "Host memory held by adapters (cached and resident), each byte once", value=float(m.get("host_bytes", 0)))
        counters = (("requests_total", "lorakit_requests", "Requests accepted by the engine"),
                    ("tokens_generated_total", "lorakit_generated_tokens", "Tokens generated"),
                    ("adapter_hits", "lorakit_adapter_cache_hits", "Adapter lookups served from the host cache"),
                    ("adapter_misses", "lorakit_adapter_cache_misses", "Adapter lookups that read the disk"),
                    ("adapter_evictions", "lorakit_adapter_cache_evictions", "Adapters evicted from the host cache"),
                    ("adapter_loads", "lorakit_adapter_loads", "Adapters loaded from disk"))
        for key, name, text in counters:
            yield CounterMetricFamily(name, text, value=float(m[key]))
        yield CounterMetricFamily("lorakit_rejected_queue_full", "Requests refused with 429 (queue full)",
                                  value=float(m.get("rejected_queue_full", 0)))
        yield CounterMetricFamily("lorakit_failed_requests", "Requests the engine failed while generating",
                                  value=float(m.get("requests_failed", 0)))
        per_adapter = CounterMetricFamily("lorakit_adapter_requests", "Requests per adapter (the base model under its own name)",
                                          labels=["adapter"])
        for adapter, count in sorted(m["per_adapter_requests"].items(), key=lambda kv: str(kv[0])):
            per_adapter.add_metric([self.engine.model_name if adapter is None else str(adapter)], float(count))
        yield per_adapter


class _CountResponses:
    """Pure ASGI middleware counting HTTP responses by route and status (no BaseHTTPMiddleware,
    which would hide client disconnects from the handlers)."""

    def __init__(self, app, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                self.counter.labels(scope["path"] if scope["path"] in _ROUTES else "other", str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counted)


class _LimitBody:
    """Pure ASGI middleware reading each request body before the app sees it: more than
    `max_bytes` (by Content-Length, before reading, or counted as a chunked body arrives) is answered
    413, a body not complete `timeout` seconds after the request began 408, both with OpenAI's error
    body; a body that arrived is replayed to the app, whose later receive() calls (disconnect
    detection) reach the client's. Waiting for a slow client takes no thread: others are unaffected."""

    DRAIN_SECONDS = 2.0

    def __init__(self, app, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        # A client still sending when the server answers and closes gets a TCP reset that can destroy
        # the 413 before it is read; so a body up to 4x the limit is read and dropped first (bounded
        # in bytes and time, as a web server's lingering close), a larger one is refused at once.
        self.drain_bytes = 4 * max_bytes

    async def _drain(self, receive, budget: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.DRAIN_SECONDS
        while budget > 0:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            budget -= len(message.get("body", b""))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit() and int(declared) <= self.drain_bytes:
                await self._drain(receive, int(declared))
            return await self._refuse(send, RequestTooLarge(self._too_large(declared.decode("latin-1"))))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await self._refuse(send, RequestTimeout(
                    f"the request body did not arrive within {self.timeout:g} s ({size} bytes received); "
                    "send the whole body promptly (the server's --body-timeout)"))
            if message["type"] == "http.disconnect":
                return  # the client is gone: nobody reads an answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, self.drain_bytes - size)
                return await self._refuse(send, RequestTooLarge(self._too_large(f"more than {self.max_bytes}")))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: str) -> str:
        return (f"the request body ({size} bytes) is over the server's limit of {self.max_bytes} bytes "
                "(--max-body-bytes); send a smaller request")

    @staticmethod
    async def _refuse(send, error: ServeError) -> None:
        payload = json.dumps(_error_body(error.status, str(error), error.error_type)).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
           "/v1/unload_lora_adapter", "/health", "/metrics"}


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

def create_app(engine, *, shutdown_timeout: float = 30.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    """The FastAPI app serving `engine`. Starting it (uvicorn's lifespan) does not start the engine
    (call `engine.start()`, as `serve` does); stopping it shuts the engine down gracefully: queued
    and running requests finish within `shutdown_timeout` seconds, later ones are cancelled.
    max_body_bytes, body_timeout: the request-body limits (413, 408; see the module docstring)."""
    if max_body_bytes < 1 or not body_timeout > 0:
        raise InvalidRequest(f"max_body_bytes ({max_body_bytes}) and body_timeout ({body_timeout}) must be positive")
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.shutdown, graceful=True, timeout=shutdown_timeout)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine))
    http_responses = Counter("lorakit_http_responses", "HTTP responses by route and status", ["route", "status"],
                             registry=registry)
    app.state.registry = registry
    app.add_middleware(_LimitBody, max_bytes=max_body_bytes, timeout=body_timeout)
    app.add_middleware(_CountResponses, counter=http_responses)  # outermost: it counts the 413s and 408s too

    @app.exception_handler(ServeError)
    async def on_serve_error(request: Request, error: ServeError):
        return _error(error.status, str(error), error.error_type)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors())
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        cause = error.__cause__
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's "error parsing the body", made specific
            message = (f"request body is not valid UTF-8 (byte {cause.object[cause.start:cause.start + 1]!r} at "
                       f"position {cause.start}); send JSON encoded as UTF-8")
        elif isinstance(cause, RecursionError):
            message = "request body is nested too deeply to parse; send a flatter JSON object"
        if error.status_code == 404:
            message += f"; routes: {', '.join(sorted(_ROUTES))}"
        return _error(error.status_code, message, "not_found_error" if error.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception):
        return _error(500, f"internal error while handling {request.url.path}: {type(error).__name__}: {error}", "server_error")

    # -- helpers over the engine ---------------------------------------------------------------

    def sampling(body: _Body, max_tokens: int | None) -> SamplingParams:
        if body.n not in (None, 1):
            raise InvalidRequest(f"n={body.n} is not supported; send n=1 (one choice per prompt) and repeat the request for more")
        if body.logprobs not in (None, False):
            raise InvalidRequest("logprobs are not supported; leave 'logprobs' out")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(max_tokens=16 if max_tokens is None else max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stop,
                              ignore_eos=body.ignore_eos)

    def adapter_of(body: _Body) -> str | None:
        return None if body.model in (None, "", engine.model_name) else body.model

    async def submit_all(prompts: list, adapter: str | None, params) -> list:
        handles = []
        try:
            for prompt in prompts:
                handles.append(await run_in_threadpool(engine.submit, prompt, adapter, params))
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def results_or_cancel(request: Request, handles: list) -> list | Response:
        """Every handle's result; a 499 response (never read) when the client goes away first, whose
        requests are cancelled; a 500 JSON error when the engine failed the request."""
        results = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({results, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            if not results.done() or results.exception() is not None:
                for handle in handles:
                    handle.cancel()
        if not results.done():  # the client is gone: nobody reads the answer
            results.cancel()
            return Response(status_code=499)  # nginx's "client closed request"
        error = results.exception()
        if error is None:
            return results.result()
        body = _failure_body(error)
        return JSONResponse(body, status_code=body["error"]["code"])

    def usage(completions: list) -> dict:
        prompt = sum(c.prompt_tokens for c in completions)
        generated = sum(c.completion_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def stream(handles: list, make_chunk, first_chunks: list, include_usage: bool, model: str, ident: str,
               obj: str) -> StreamingResponse:
        created = int(time.time())

        def event(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": ident, "object": obj, "created": created, "model": model,
                                          "choices": choices, **extra}) + "\n\n"

        async def pump(index: int, handle, queue: asyncio.Queue) -> None:
            try:
                async for delta in handle.astream():
                    if delta:
                        await queue.put((index, delta, None))
                await queue.put((index, None, handle.result()))  # astream ended: the result is there
            except Exception as error:  # the engine failed this request: report it in the stream
                await queue.put((index, None, error))

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()
            tasks = [asyncio.ensure_future(pump(i, h, queue)) for i, h in enumerate(handles)]
            finished: list = []
            try:
                for index in range(len(handles)):
                    for chunk in first_chunks:
                        yield event([chunk(index)])
                while len(finished) < len(handles):
                    index, delta, done = await queue.get()
                    if delta is not None:
                        yield event([make_chunk(index, delta, None)])
                        continue
                    finished.append(done)
                    if isinstance(done, Exception):  # as vLLM: an error event, then [DONE]
                        yield "data: " + json.dumps(_failure_body(done)) + "\n\n"
                    else:
                        yield event([make_chunk(index, None, done.finish_reason)])
                if include_usage:
                    yield event([], usage=usage([c for c in finished if not isinstance(c, Exception)]))
                yield "data: [DONE]\n\n"
            finally:  # client gone (generator closed) or done: nothing may keep running for it
                for handle in handles:
                    handle.cancel()
                for task in tasks:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        # not started, died, shutting down, wedged in a step or stalled: a load balancer should look elsewhere
        report = engine.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        card = dict(object="model", created=created, owned_by="lorakit", max_model_len=engine.max_context)
        names = await run_in_threadpool(engine.store.names)
        data = [dict(id=engine.model_name, root=engine.model_name, parent=None, **card)]
        # vLLM's root is the adapter's local path; a public listing names the adapter instead of server paths.
        data += [dict(id=name, root=name, parent=engine.model_name, **card) for name in names]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraBody):
        await run_in_threadpool(engine.store.register, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraBody):
        await run_in_threadpool(engine.store.unregister, body.lora_name)
        engine.forget_adapter(body.lora_name)  # and its resident copy: a reload of the name serves the new weights
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo:
            raise InvalidRequest("echo=true is not supported; leave 'echo' out and prepend the prompt yourself")
        prompts = _prompt_list(body.prompt)
        model = body.model or engine.model_name
        handles = await submit_all(prompts, adapter_of(body), sampling(body, body.max_tokens))
        ident = f"cmpl-{uuid.uuid4().hex}"

        def choice(index: int, text: str | None, finish_reason: str | None) -> dict:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        if body.stream:
            return stream(handles, choice, [], _include_usage(body), model, ident, "text_completion")
        done = await results_or_cancel(request, handles)
        if isinstance(done, Response):
            return done
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [choice(i, c.text, c.finish_reason) for i, c in enumerate(done)], "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        if not body.messages:
            raise InvalidRequest("field 'messages': expected a non-empty list of {'role', 'content'} objects")
        for i, message in enumerate(body.messages):
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content", ""), (str, type(None))):
                raise InvalidRequest(f"field 'messages.{i}': expected {{'role': str, 'content': str}}, got {message!r}")
        try:
            prompt = await run_in_threadpool(engine.apply_chat_template, body.messages)
        except ServeError:
            raise
        except Exception as error:  # the tokenizer's template refused the conversation
            raise InvalidRequest(f"field 'messages': the chat template refused them: {error}") from error
        model = body.model or engine.model_name
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        handles = await submit_all([prompt], adapter_of(body), sampling(body, max_tokens))
        ident = f"chatcmpl-{uuid.uuid4().hex}"

        def delta_choice(index: int, text: str | None, finish_reason: str | None) -> dict:
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish_reason}

        if body.stream:
            role = lambda index: {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,  # noqa: E731
                                  "finish_reason": None}
            return stream(handles, delta_choice, [role], _include_usage(body), model, ident, "chat.completion.chunk")
        done = await results_or_cancel(request, handles)
        if isinstance(done, Response):
            return done
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(done)],
                "usage": usage(done)}

    return app


def _prompt_list(prompt) -> list:
    """OpenAI's prompt forms -> a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("field 'prompt': empty; send a string or a list of token ids")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _include_usage(body: _Body) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_server(engine, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
                 log_level: str = "info", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT):
    """The uvicorn server `serve` runs (the engine is not started): on SIGINT/SIGTERM (or
    `should_exit`) it first drains the engine — running and queued requests get `shutdown_timeout`
    seconds to finish, the rest end with finish_reason "cancelled", and new requests get 503 — so
    every open stream ends with its last chunk and `[DONE]`; then uvicorn closes the connections."""
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            drain = asyncio.ensure_future(asyncio.to_thread(engine.shutdown, graceful=True, timeout=shutdown_timeout))
            while not drain.done():
                if self.force_exit:  # a second Ctrl-C: cancel what is left now
                    await asyncio.to_thread(engine.shutdown, graceful=False)
                await asyncio.wait({drain}, timeout=0.1)
            await super().shutdown(sockets=sockets)

    app = create_app(engine, shutdown_timeout=shutdown_timeout, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    config = uvicorn.Config(app, host=host, port=port,
                            log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    return _DrainingServer(config)


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, shutdown_timeout: float = 30.0,
          log_level: str = "info", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
    """Start the engine and serve it until SIGINT/SIGTERM, then shut down as `build_server` says."""
    engine.start()
    try:
        build_server(engine, host, port, shutdown_timeout=shutdown_timeout, log_level=log_level,
                     max_body_bytes=max_body_bytes, body_timeout=body_timeout).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after the shutdown
        pass
