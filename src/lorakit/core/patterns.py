"""Regular expressions that come from users and files: `rank_pattern` / `alpha_pattern` keys and a
`target_modules` regex.

They are compiled with RE2 (google-re2), whose matching time is linear in the module name, so a
pathological pattern from an adapter file (`(a+)+$`, `(.|.)*x`) cannot freeze the process with the
GIL held, as Python's backtracking `re` does. The matching rules are PEFT's, word for word:

- a pattern key matches a module when ``(.*\\.)?(KEY)$`` matches its path from the start
  (`peft.utils.other.get_pattern_key`); the first matching key wins, and a key no regex matches
  still applies to a module whose path equals it (PEFT's fallback lookup);
- a `target_modules` string must match the whole module path (`re.fullmatch`, as PEFT).

RE2 has no backreferences (``\\1``), lookarounds (``(?=``, ``(?!``, ``(?<=``), ``\\Z`` (write
``\\z``) or ``{,n}`` (write ``{0,n}``); such a pattern is refused with a ConfigError naming the
field and the key, never handed to Python's `re`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import re2

from lorakit.core.errors import ConfigError

MAX_PATTERN_CHARS = 4096  # far beyond any real module pattern; bounds compile time and memory
# PEFT anchors a pattern key at a path-component boundary and at the end of the path.
_PATTERN_KEY_TEMPLATE = r"(.*\.)?({key})$"


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the error is raised (with its reason) instead of logged to stderr
    options.never_capture = True  # only match / no match is needed: the faster engines apply
    return options


_OPTIONS = _options()


@functools.lru_cache(maxsize=4096)
def _compile(source: str, field: str, key: str) -> Any:
    if len(key) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"{field} pattern {key[:80]!r}... is {len(key)} characters long; patterns over module names "
            f"are limited to {MAX_PATTERN_CHARS}"
        )
    if "{," in key:  # Python reads {,n} as {0,n}, RE2 as literal text: refuse rather than disagree with PEFT
        raise ConfigError(f"{field} pattern {_shown(key)} uses '{{,n}}'; write '{{0,n}}' (the same meaning in every engine)")
    try:
        return re2.compile(source, _OPTIONS)
    except re2.error as err:
        reason = err.args[0].decode(errors="replace") if err.args and isinstance(err.args[0], bytes) else str(err)
        raise ConfigError(
            f"{field} pattern {_shown(key)} is not a regular expression lorakit can match safely ({reason}). Patterns "
            "are matched with RE2 (linear time, so no pattern can hang the process): backreferences, lookarounds "
            "and \\Z are not available; list the module names instead, or rewrite the pattern without them"
        ) from None


def _shown(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 120 else text[:120] + "..."


def check_pattern_keys(field: str, patterns: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming `field` and the key if any key of `patterns` cannot be matched safely."""
    for key in patterns:
        if not isinstance(key, str):
            raise ConfigError(f"{field} key {_shown(key)} must be a string (a module name or a regular expression)")
        _compile(_PATTERN_KEY_TEMPLATE.format(key=key), field, key)


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any, field: str = "rank_pattern/alpha_pattern") -> Any:
    """Per-module override as PEFT resolves `rank_pattern` / `alpha_pattern`: the value of the first key
    that matches the end of the module path (a regex on whole path components), else `default`."""
    for key, value in patterns.items():
        if _compile(_PATTERN_KEY_TEMPLATE.format(key=key), field, key).match(module_name):
            return value
    return patterns.get(module_name, default)


def check_target_regex(pattern: str, field: str = "target_modules") -> None:
    """Raise a ConfigError naming `field` if the `target_modules` regex cannot be matched safely."""
    _compile(pattern, field, pattern)


def fullmatch_target(pattern: str, module_name: str, field: str = "target_modules") -> bool:
    """Whether a `target_modules` regex selects `module_name` (the whole path must match, as PEFT)."""
    return _compile(pattern, field, pattern).fullmatch(module_name) is not None
