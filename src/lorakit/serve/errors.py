"""Errors the serving stack raises. Each carries the HTTP status the server answers with and an
OpenAI-style error type, so one bad request gets a 4xx naming the problem and nothing else fails."""

from __future__ import annotations

from lorakit.core.errors import LorakitError


class ServeError(LorakitError):
    """A request the engine or server refuses; `status` is the HTTP status code to answer with."""

    status: int = 400
    error_type: str = "invalid_request_error"


class InvalidRequest(ServeError, ValueError):
    """A field holds a value outside its allowed range (max_tokens <= 0, top_p outside (0, 1], ...)."""


class PromptTooLong(InvalidRequest):
    """Prompt plus max_tokens does not fit the model's context."""


class UnknownAdapter(ServeError, KeyError):
    """No adapter of that name is registered (and no sub-folder of the adapter root has it)."""

    status = 404
    error_type = "not_found_error"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterPathError(ServeError):
    """An adapter path points outside the configured adapter root (path traversal)."""

    status = 403
    error_type = "permission_error"


class CorruptAdapter(ServeError):
    """An adapter folder exists but cannot be served: missing or unreadable files, wrong shapes,
    an adapter that is not LoRA and cannot be turned into one."""

    status = 422


class AdapterTooLarge(CorruptAdapter):
    """One adapter needs more host memory than the store's whole budget."""


class AdapterConflict(ServeError):
    """load_lora_adapter for a name already registered with a different path."""

    status = 409


class NonFiniteLogits(ServeError):
    """The model's logits for one request held inf or NaN (typically an adapter with huge weights,
    or a dtype that overflows): that request fails, the others in its batch carry on."""

    status = 422


class RequestTooLarge(InvalidRequest):
    """A request body over the server's byte limit (`--max-body-bytes`)."""

    status = 413


class RequestTimeout(InvalidRequest):
    """A request body that did not arrive within the server's body timeout (`--body-timeout`)."""

    status = 408


class QueueFull(ServeError):
    """The bounded request queue is full; the client should retry later."""

    status = 429
    error_type = "rate_limit_error"


class ShuttingDown(ServeError):
    """The engine is shutting down and accepts no new requests."""

    status = 503
    error_type = "server_error"
