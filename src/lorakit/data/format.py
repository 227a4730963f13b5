"""Turn raw records into ``Example``s: a chat prompt plus the response the model should learn.

Accepted record layouts, tried in this order (field names are matched exactly):

==========================  ==============================================================
layout                      fields
==========================  ==============================================================
chat                        ``messages``: list of ``{"role", "content"}``; the last message
                            must be the assistant's answer, everything before it is the prompt
alpaca                      ``instruction`` + ``output``, optional ``input`` (appended to the
                            instruction after a blank line when non-empty)
prompt / response           ``prompt`` + ``response``
prompt / completion         ``prompt`` + ``completion``
question / answer           ``question`` + ``answer`` (e.g. GSM8K)
input / output              ``input`` + ``output``
==========================  ==============================================================

Any other layout works by naming the fields: ``to_example(r, prompt_field="sentence",
response_field="label")``. A pair layout may also carry a ``system`` field, which becomes the
system message. Numbers and booleans are converted to text, so ``{"answer": 42}`` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (prompt field, response field) pairs, in detection order; alpaca is handled separately
# because it combines two prompt fields.
PAIR_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("prompt", "response"),
    ("prompt", "completion"),
    ("question", "answer"),
    ("input", "output"),
)

ACCEPTED_LAYOUTS = (
    "messages (list of {role, content}, last one from the assistant); "
    "instruction + output (+ optional input, alpaca); "
    + "; ".join(f"{p} + {r}" for p, r in PAIR_LAYOUTS)
    + "; or name the fields with prompt_field= and response_field="
)
"""Human-readable list of the layouts ``to_example`` understands, for error messages."""


class DataFormatError(ValueError):
    """A data file or record does not have a layout lorakit understands."""


@dataclass
class Example:
    """One training or evaluation example.

    Attributes:
        messages: the prompt as chat messages (``{"role": "system"|"user"|"assistant",
            "content": str}``), ending with the turn the model answers; earlier assistant turns
            of a multi-turn chat are part of the prompt and are not trained on.
        response: the text the model should produce (the training target).
    """

    messages: list[dict] = field(default_factory=list)
    response: str = ""


def to_example(
    record: dict, prompt_field: str | None = None, response_field: str | None = None
) -> Example:
    """Convert one raw record to an ``Example``, detecting its layout (see the module docstring).

    Args:
        record: one row as read by ``load_records``.
        prompt_field: field holding the prompt text; overrides detection. When only one of
            ``prompt_field``/``response_field`` is given, the other is detected among the
            known names for its role.
        response_field: field holding the response text; overrides detection.

    Raises:
        DataFormatError: no accepted layout matches; the message lists the record's fields.
    """
    if not isinstance(record, dict):
        raise DataFormatError(
            f"A record must be a dict, got {type(record).__name__}: {record!r:.200}"
        )
    if prompt_field is not None or response_field is not None:
        prompt_key = prompt_field or _detect(record, [p for p, _ in PAIR_LAYOUTS], "prompt")
        response_key = response_field or _detect(record, [r for _, r in PAIR_LAYOUTS], "response")
        return _pair_example(record, prompt_key, response_key)
    if "messages" in record:
        return _chat_example(record["messages"])
    if "instruction" in record and "output" in record:
        instruction = _text(record, "instruction")
        extra = _text(record, "input") if record.get("input") not in (None, "") else ""
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(_prompt_messages(record, prompt), _text(record, "output"))
    for prompt_key, response_key in PAIR_LAYOUTS:
        if prompt_key in record and response_key in record:
            return _pair_example(record, prompt_key, response_key)
    raise DataFormatError(
        f"Record has no recognised layout; its fields are: {_field_list(record)}. "
        f"Accepted layouts: {ACCEPTED_LAYOUTS}."
    )


def _detect(record: dict, candidates: list[str], role: str) -> str:
    for key in dict.fromkeys(candidates):  # de-duplicated, order kept
        if key in record:
            return key
    raise DataFormatError(
        f"Could not find the {role} field: record fields are {_field_list(record)}, none of "
        f"{', '.join(dict.fromkeys(candidates))}. Pass {role}_field= explicitly."
    )


def _pair_example(record: dict, prompt_key: str, response_key: str) -> Example:
    for key in (prompt_key, response_key):
        if key not in record:
            raise DataFormatError(
                f"Record has no field {key!r}; its fields are: {_field_list(record)}."
            )
    return Example(_prompt_messages(record, _text(record, prompt_key)), _text(record, response_key))


def _prompt_messages(record: dict, prompt: str) -> list[dict]:
    messages = []
    if record.get("system") not in (None, ""):
        messages.append({"role": "system", "content": _text(record, "system")})
    messages.append({"role": "user", "content": prompt})
    return messages


def _chat_example(messages: object) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(
            "'messages' must be a non-empty list of {role, content} dicts, "
            f"got {messages!r:.200}."
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(
                f"messages[{index}] must be a dict with 'role' and 'content', got {message!r:.200}."
            )
        if not isinstance(message["content"], str):
            raise DataFormatError(
                f"messages[{index}]['content'] must be text, "
                f"got {type(message['content']).__name__}; multi-part (e.g. image) contents "
                "are not supported."
            )
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            f"The last message must be the assistant's answer (the training target), but its role "
            f"is {messages[-1]['role']!r}. Drop trailing turns or add the assistant's reply."
        )
    if len(messages) < 2:
        raise DataFormatError(
            "'messages' holds only the assistant's answer; it needs a prompt turn before it."
        )
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return Example(prompt, messages[-1]["content"])


def _text(record: dict, key: str) -> str:
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise DataFormatError(
        f"Field {key!r} must be text (or a number), got {type(value).__name__}: {value!r:.200}."
    )


def _field_list(record: dict) -> str:
    return ", ".join(repr(k) for k in record) or "(none)"
